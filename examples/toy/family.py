"""The model family of the experiment (--family): everything that differs between the SD base (a UNet that
predicts the noise) and the flow base (an SD3-style transformer on a rectified flow). Everything else (world, data,
reward model, runs, evaluation, statistics, outputs) is shared and asks the family.

A new family is one more Family here: its base model's denoiser (built and trained in base.py), the script that
trains it and the flags every run of it gets."""

from dataclasses import dataclass

FLOW_SHIFT = 3.0  # the flow base's FlowMatchEulerDiscreteScheduler shift (SD3 / SD3.5's)
# T5 tokens of the flow base (zeros: it has no T5, as StableDiffusion3Pipeline conditions without one), the same in
# base training, the training runs (--max_sequence_length), sampling and generate_pairs.py. Not the pipeline's 256:
# its 333 context tokens made each call of the toy's transformer ~3x dearer than 77 + 16 (batch 16, 1 thread, CPU).
FLOW_T5_TOKENS = 16
SD_BETA = 500.0  # the SD toy's --beta_dpo (epsilon errors)


@dataclass(frozen=True)
class Family:
    name: str
    script: str  # the training script, run through accelerate launch
    base_version: str  # the base model's code version (its cache key)
    base_keys: tuple  # the preset keys that make the base model (its cache key)
    denoiser: str  # the base pipeline's trained network (its folder)
    train_flags: tuple = ()  # flags every training run of this family gets
    sample_flags: tuple = ()  # flags of generate_pairs.py and the probe (sampling and conditioning as the runs')
    dpo_name: str = "Diffusion-DPO"

    def default_beta(self):
        """The experiment's --beta_dpo: the SD toy's 500; for the flow base the same beta converted to velocity
        errors, 500 x E[(1 - s)^2] under the training density (smpo.processes.converted_beta, docs/flow.md)."""
        if self.name == "sd":
            return SD_BETA
        return float(round(converted_beta(SD_BETA)))


def pipeline_kwargs(pipe):
    """What every call of the base's pipeline gets besides the prompt: the flow base's T5 tokens."""
    return {"max_sequence_length": FLOW_T5_TOKENS} if getattr(pipe, "transformer", None) is not None else {}


def flow_process():
    """The flow base's rectified flow as train_smpo_diffusion_sd3.py draws it by default (logit-normal, shift 3)."""
    from smpo.processes import RectifiedFlow, flow_sigmas

    return RectifiedFlow(flow_sigmas(FLOW_SHIFT))


def converted_beta(beta_eps):
    from smpo.processes import converted_beta as convert

    return convert(beta_eps, flow_process())


FAMILIES = {
    "sd": Family("sd", "train_smpo_diffusion.py", "toy-base-v1",
                 ("world_size", "vae_channels", "vae_steps", "unet_channels", "unet_steps", "base_batch"), "unet"),
    "flow": Family("flow", "train_smpo_diffusion_sd3.py", "toy-flow-base-v1",
                   ("world_size", "vae_channels", "vae_steps", "flow_layers", "flow_heads", "flow_head_dim",
                    "flow_steps", "base_batch"), "transformer",
                   train_flags=("--max_sequence_length", str(FLOW_T5_TOKENS)),
                   sample_flags=("--max_sequence_length", str(FLOW_T5_TOKENS)), dpo_name="Flow-DPO"),
}
