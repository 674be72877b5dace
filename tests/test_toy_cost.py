"""The toy experiment's cost columns come from the UNet work the training runs counted (smpo.cost), not from time."""

import os
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "examples"))
from toy.experiment import parse_args  # noqa: E402
from toy.report import dpo_level_note  # noqa: E402
from toy.runs import claim_runs_dir  # noqa: E402
from toy.stats import aggregate, compare_with_dpo  # noqa: E402


def compared(prefs, base_level, work_per_step):
    """compare_with_dpo() on one training seed of dpo and smpo: ``prefs`` {(method, step): mean preference},
    ``work_per_step`` {method: counted UNet work a step}, steps 1 to 4."""
    methods = {name: {"label": name, "flags": []} for name in work_per_step}
    jobs = [(name, 0, step, None) for (name, step) in prefs]
    evaluated = [{"true_preference": p, "true_preference_se": 0.01} for p in prefs.values()]
    records = {(name, 0): {"metrics_last": {}, "seconds_per_step": None,
                           "unet_work_total": {s: per_step * s for s in range(1, 5)}}
               for name, per_step in work_per_step.items()}
    base = {"true_preference": base_level, "true_preference_se": 0.01}
    results = {"methods": aggregate(methods, [(name, 0) for name in methods], jobs, evaluated, base, records),
               "base": base}
    compare_with_dpo(results)
    return results


def test_work_to_reach_dpo_final_is_the_counted_work_at_the_first_step_that_reaches_it():
    """DPO: 8 units a step, reaches its final 0.2 at step 4 (32 units). SmPO: 48 a step (6x), reaches 0.2 already at
    step 2 (96 units): 3x DPO's work to get there, though half the steps."""
    results = compared({("dpo", 2): 0.1, ("dpo", 4): 0.2, ("smpo", 2): 0.25, ("smpo", 4): 0.3}, base_level=0.0,
                       work_per_step={"dpo": 8, "smpo": 48})
    dpo, smpo = results["methods"]["dpo"], results["methods"]["smpo"]
    assert [smpo["curve"][s]["unet_work"] for s in ("0", "2", "4")] == [0, 96, 192]
    assert (dpo["unet_work_per_step"], smpo["unet_work_per_step"]) == (8, 48)
    assert smpo["unet_work_per_step_vs_dpo"] == 6.0
    assert results["steps_to_dpo_final"] == {"dpo": 4, "smpo": 2}
    assert (dpo["unet_work_to_dpo_final"], smpo["unet_work_to_dpo_final"]) == (32, 96)
    assert smpo["unet_work_to_dpo_final_vs_dpo"] == 3.0
    assert smpo["step_cost_vs_dpo"] is None  # no wall-clock time recorded: no wall-clock column, not a guess


def test_no_cost_to_reach_dpo_final_when_dpo_ends_below_the_base():
    """DPO ends at 0.1 from a base at 0.3: every curve holds that level at step 0, so no steps or work are given."""
    results = compared({("dpo", 2): 0.2, ("dpo", 4): 0.1, ("smpo", 2): 0.5, ("smpo", 4): 0.6}, base_level=0.3,
                       work_per_step={"dpo": 8, "smpo": 8})
    assert results["dpo_final_above_base"] is False
    assert results["steps_to_dpo_final"] == {"dpo": None, "smpo": None}
    assert results["methods"]["smpo"]["unet_work_to_dpo_final_vs_dpo"] is None
    assert "not above the base's (+0.300)" in dpo_level_note(results)


def test_prior_noise_methods_need_the_on_policy_pairs_that_record_the_noise(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--methods", "dpo", "smpo_prior"])
    assert "--data_source on_policy" in capsys.readouterr().err
    args = parse_args(["--data_source", "on_policy", "--methods", "smpo_prior", "dpo_prior"])
    assert args.methods == ["smpo_prior", "dpo_prior"]


def test_a_runs_folder_refuses_an_experiment_on_other_data(tmp_path):
    """Runs are keyed by method and seed: a second experiment with other data in the same work folder would
    overwrite them (or, with --reuse_runs, reuse them); it stops first, naming both."""
    runs = tmp_path / "runs-on-policy"
    scored = lambda name: str(tmp_path / name / "pairs-scored")  # noqa: E731
    claim_runs_dir(str(runs), str(tmp_path / "base-a"), scored("on-policy-warm"))
    claim_runs_dir(str(runs), str(tmp_path / "base-a"), scored("on-policy-warm"))  # the same experiment again: fine
    with pytest.raises(SystemExit, match="on-policy-cold.*own --work_dir"):
        claim_runs_dir(str(runs), str(tmp_path / "base-a"), scored("on-policy-cold"))
    with pytest.raises(SystemExit, match="base-b"):
        claim_runs_dir(str(runs), str(tmp_path / "base-b"), scored("on-policy-warm"))
