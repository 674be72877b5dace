"""Checkpoints that survive being killed: atomic checkpoint-N folders, exact resume, stop signals.

A checkpoint is written to ``checkpoint-N.tmp`` and renamed to ``checkpoint-N`` only when every
process has finished writing, so a run killed mid-save leaves the previous checkpoint as the
latest complete one. ``checkpoint-N/`` holds the LoRA weights (``pytorch_lora_weights.safetensors``)
or the full network (``unet/`` or ``transformer/``), the optimizer, LR scheduler, sampler and RNG states, and the state
of the run (step generator, bad-pair and non-finite counters).
"""

import logging
import os
import re
import shutil
import signal

import torch
from accelerate.utils import extract_model_from_parallel as unwrap  # DDP / DeepSpeed / FSDP wrappers off

logger = logging.getLogger("smpo")
TMP_SUFFIX = ".tmp"


def lora_state_dict(unet, denoiser="unet"):
    """The LoRA weights of the network in the format its pipeline's ``load_lora_weights`` reads all of.

    A UNet: diffusers' format (``convert_state_dict_to_diffusers``, as diffusers' SD/SDXL scripts save it).
    A transformer (SD3, FLUX): PEFT's keys, as diffusers' DreamBooth LoRA scripts save it (the SD3 loader
    silently skips the attention's ``to_q.lora.down``-style keys that the conversion writes).
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unwrap(unet))
    return convert_state_dict_to_diffusers(state) if denoiser == "unet" else state


def save_lora(pipeline_class, folder, unet, denoiser="unet"):
    """``pipeline_class.save_lora_weights(folder, <denoiser>_lora_layers=...)``: what load_lora_weights loads."""
    pipeline_class.save_lora_weights(folder, **{f"{denoiser}_lora_layers": lora_state_dict(unet, denoiser)})


def load_lora_into_existing_adapter(unet, pipeline_class, folder, denoiser="unet"):
    """Resume: set the saved LoRA weights into the network's existing adapter (no second adapter)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state = pipeline_class.lora_state_dict(folder)
    state = state[0] if isinstance(state, tuple) else state
    prefix = f"{denoiser}."
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"LoRA checkpoint in {folder} has keys the UNet does not: {unexpected[:5]}")


def register_checkpoint_hooks(accelerator, full_finetune, pipeline_class, denoiser="unet"):
    """Save only what is trained (LoRA weights, or the network in ``denoiser``/), and load it back into the same
    modules."""
    from diffusers.training_utils import cast_training_params

    def save_hook(models, weights, output_dir):
        if not accelerator.is_main_process:
            return
        for model in models:
            if full_finetune:
                unwrap(model).save_pretrained(os.path.join(output_dir, denoiser))
            else:
                save_lora(pipeline_class, output_dir, model, denoiser)
            if weights:
                weights.pop()

    def load_hook(models, input_dir):
        while models:
            model = unwrap(models.pop())
            if full_finetune:
                loaded = type(model).from_pretrained(input_dir, subfolder=denoiser)
                model.load_state_dict(loaded.state_dict())
            else:
                load_lora_into_existing_adapter(model, pipeline_class, input_dir, denoiser)
                cast_training_params(model, torch.float32)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


class StepGenerator:
    """The generator behind timesteps, noise and VAE sampling; saved in checkpoints so resume is exact.

    It lives on the CPU: the timesteps are then known on the host without a device sync, and the
    draws do not depend on the accelerator.
    """

    def __init__(self, seed):
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)

    def state_dict(self):
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["state"])


def list_checkpoints(output_dir):
    """Complete checkpoint-N folders, oldest first (``.tmp`` folders of interrupted saves are not)."""
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", d)]
    return sorted(names, key=lambda d: int(d.split("-")[1]))


def find_checkpoint(output_dir, resume_from_checkpoint):
    """The checkpoint folder to resume from, None to start fresh."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint != "latest":  # checked to be a folder before the run (smpo/preflight.py)
        return resume_from_checkpoint
    found = list_checkpoints(output_dir)
    if not found:
        logger.info(f"no checkpoint in {output_dir}; starting a new run")
        return None
    return os.path.join(output_dir, found[-1])


def checkpoint_step(path):
    return int(os.path.basename(os.path.normpath(path)).split("-")[-1])


def save_checkpoint(accelerator, output_dir, global_step, total_limit=None):
    """Write checkpoint-N atomically, then keep at most ``total_limit`` complete checkpoints."""
    final = os.path.join(output_dir, f"checkpoint-{global_step}")
    tmp = final + TMP_SUFFIX
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    _crash_here_if_asked(global_step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.exists(final):  # the same step saved again after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None:
            for name in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(os.path.join(output_dir, name))
        logger.info(f"saved {final}")
    accelerator.wait_for_everyone()


def remove_partial_checkpoints(output_dir):
    """Remove checkpoint-N.tmp folders left by a run killed while saving."""
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if re.fullmatch(r"checkpoint-\d+" + re.escape(TMP_SUFFIX), name):
                logger.warning(f"removing {name}: an incomplete checkpoint of an interrupted save")
                shutil.rmtree(os.path.join(output_dir, name))


def _crash_here_if_asked(global_step):
    """Test hook: SMPO_TEST_KILL_DURING_SAVE=N kills the process after writing checkpoint-N.tmp."""
    if os.environ.get("SMPO_TEST_KILL_DURING_SAVE") == str(global_step):
        os.kill(os.getpid(), signal.SIGKILL)


class StopSignal:
    """SIGTERM / SIGINT ask the run to save a checkpoint and stop at the end of the current step.

    A second signal stops at once. With several processes, the request is shared through
    Accelerate's trigger (any process that got it stops all of them at the same step).
    """

    def __init__(self):
        self.signum = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: give up at once
            signal.signal(signum, self._previous.get(signum) or signal.SIG_DFL)
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning(f"got signal {signal.Signals(signum).name}: saving a checkpoint after this step, then stopping")

    def requested(self, accelerator):
        """The signal number when any process was asked to stop (SIGTERM for the processes that were not)."""
        if self.signum is not None:
            accelerator.set_trigger()
        if accelerator.check_trigger():  # one collective; resets the trigger
            return self.signum or signal.SIGTERM
        return None

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
