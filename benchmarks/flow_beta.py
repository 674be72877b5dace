#!/usr/bin/env python
"""The flow beta conversion factor E[(1 - s)^2] per timestep density and shift (method notes, section 8).

    python benchmarks/flow_beta.py --output_json docs/flow/beta_conversion.json

beta_v = beta_eps * E[(1 - s)^2] matches an epsilon-DPO beta on average; computed by
smpo.processes.RectifiedFlow.mean_squared_one_minus_sigma (200,000 draws, seed 0) on the scheduler's sigmas.
Also records the default --beta_dpo of train_smpo_diffusion_sd3.py derived from it.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from smpo.processes import WEIGHTING_SCHEMES, RectifiedFlow, flow_sigmas  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_json", required=True)
    args = p.parse_args()
    factors = {f"shift {shift:g}": {scheme: round(RectifiedFlow(flow_sigmas(shift), scheme)
                                                  .mean_squared_one_minus_sigma(), 4)
                                    for scheme in WEIGHTING_SCHEMES}
               for shift in (1.0, 3.0)}
    import train_smpo_diffusion_sd3

    result = {"what": "E[(1 - s)^2] under each --weighting_scheme (default logit_mean 0, logit_std 1, mode_scale "
                      "1.29), computed, not measured", "factors": factors,
              "sd3_default_beta_dpo": train_smpo_diffusion_sd3.BETA_DPO, "from_epsilon_beta": 2000.0}
    with open(args.output_json, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
