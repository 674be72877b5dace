"""Shared fixtures: the tiny offline assets are built once per test session."""

import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Nothing in the tests may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Under pytest-xdist each worker gets one core: in-process tests use one torch thread, like the scripts they launch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_script(args, cwd=ROOT, timeout=600, check=True, env=None):
    """Run a command (a list) and return the CompletedProcess; on failure show its output."""
    full_env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false",
                # scripts that call `python` / `accelerate` get this interpreter's environment
                "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""), **(env or {})}
    # Its own process group, so that a timeout stops what it started too (SIGTERM first: torchrun passes
    # it on to its workers, which run in sessions of their own).
    with subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                          start_new_session=True) as child:
        try:
            out, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(child.pid, sig)
                    out, err = child.communicate(timeout=30)
                    break
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    out, err = "", "(no output: a process it started still holds its pipes)"
            raise AssertionError(f"command timed out after {timeout} s: {' '.join(map(str, args))}\n"
                                 f"--- stdout ---\n{out[-6000:]}\n--- stderr ---\n{err[-8000:]}") from None
    proc = subprocess.CompletedProcess(args, child.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(map(str, args))}\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
        )
    return proc


def index_only_model(tiny_assets, folder, model="tiny-sd"):
    """A folder that passes the up-front model check (smpo/preflight.py) but holds no model to load: a test on it
    shows that a check answers before any model loads."""
    folder.mkdir()
    (folder / "model_index.json").write_text((tiny_assets / model / "model_index.json").read_text())
    return folder


def accelerate_launch(script, *args, **kwargs):
    """`accelerate launch` on one CPU process, as a user would run it."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", os.path.join(ROOT, script), *map(str, args)]
    return run_script(cmd, **kwargs)


def main_in_process(script, *args, env=None):
    """A script's main(parse_args(args)) in this process, on the CPU as accelerate_launch runs it: no interpreter
    start and no imports (most of a tiny run's cost). For runs whose launch path other runs of the same script
    cover. One torch thread, as run_script gives a launched run (so the two give the same
    numbers); accelerate's process state is reset after, so the next run starts afresh."""
    import importlib

    import torch
    from accelerate.state import AcceleratorState, GradientState

    module = importlib.import_module(os.path.splitext(script)[0])
    saved, threads = dict(os.environ), torch.get_num_threads()
    os.environ.update({"ACCELERATE_USE_CPU": "true", **(env or {})})
    torch.set_num_threads(1)
    try:
        module.main(module.parse_args([str(a) for a in args]))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        os.environ.clear()
        os.environ.update(saved)
        torch.set_num_threads(threads)


def lora_up(weights):
    """The LoRA up (B) matrices, zero at initialisation, in diffusers' saved format (a safetensors dict)."""
    return [v for k, v in weights.items() if ".lora.up." in k or "lora_B" in k]


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """examples/make_tiny_assets.py output: tiny-sd, tiny-sd-vpred, tiny-sdxl, tiny-sd3, tiny-sd3-no-t5, tiny-reward,
    tiny-pickapic."""
    out = tmp_path_factory.mktemp("tiny")
    run_script([sys.executable, os.path.join(ROOT, "examples", "make_tiny_assets.py"), str(out)])
    return out


@pytest.fixture(scope="session")
def scored_dataset(tiny_assets, tmp_path_factory):
    """tiny-pickapic scored by the tiny reward model through score_pairs.py."""
    out = tmp_path_factory.mktemp("scored") / "tiny-pickapic-scored"
    run_script([sys.executable, os.path.join(ROOT, "score_pairs.py"),
                "--dataset_name", str(tiny_assets / "tiny-pickapic"),
                "--reward_model_name_or_path", str(tiny_assets / "tiny-reward"),
                "--output_dir", str(out), "--batch_size", "4", "--device", "cpu"])
    return out


# The modules whose end-to-end runs take longest, longest first (CPU seconds of `-n 0` runs of each module, on a
# loaded 2-core machine, 2026-11-30). pytest-xdist hands out whole modules (--dist=loadfile, pyproject.toml) in
# collection order, so starting the long ones first keeps both workers busy to the end. Tests within a module keep
# their order.
SLOW_MODULES = ["test_toy_alignment", "test_readme", "test_reliability", "test_performance", "test_toy_flow",
                "test_flow_tools", "test_run_checks", "test_generate_pairs", "test_train_sd", "test_objectives", "test_train_sd3",
                "test_train_flux", "test_evaluate", "test_train_sdxl", "test_prior_noise"]


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.module.__name__.rsplit(".", 1)[-1]
        return SLOW_MODULES.index(name) if name in SLOW_MODULES else len(SLOW_MODULES)

    items.sort(key=rank)  # stable
