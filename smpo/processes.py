"""The noising process a model was trained with: what differs between epsilon/v models and flow models.

The training step, the noise sources and the inversion ask a process; they never ask which kind it is.

- :class:`Diffusion` (SD 1.x/2.x, SDXL): integer timesteps t, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,
  target eps or v, the UNet told t, DDIM + ReNoise inversion (method notes, sections 1-4).
- :class:`RectifiedFlow` (SD3, SD3.5, FLUX): sigmas s in (0, 1], x_s = (1 - s) x0 + s eps, target
  v = eps - x0, the network told s * time_scale, Euler + ReNoise inversion (method notes, section 8).

A process's ``t`` is its own time value, one per sample, on the CPU when drawn: integer timesteps for
:class:`Diffusion`, float sigmas for :class:`RectifiedFlow`. Every method returns fp32.
"""

from dataclasses import dataclass

import torch

from .losses import denoising_target
from .renoise import add_noise, epsilon_from_prediction, flow_inversion, renoise_inversion

WEIGHTING_SCHEMES = ("logit_normal", "mode", "uniform")


@dataclass
class Diffusion:
    """A DDPM-style process: the training scheduler's alphas_cumprod (fp32), prediction type and steps_offset."""

    alphas_cumprod: torch.Tensor
    prediction_type: str
    steps_offset: int = 1

    def draw_timesteps(self, num_pairs, generator, conditioning):
        """One timestep per pair on the CPU: the conditioning's rule (uniform; SDXL-Turbo its four)."""
        return conditioning.sample_timesteps(num_pairs, len(self.alphas_cumprod), generator)

    def add_noise(self, x0, noise, t):
        return add_noise(x0, noise, t, self.alphas_cumprod)

    def target(self, x0, noise, t):
        return denoising_target(noise, x0, t, self.alphas_cumprod, self.prediction_type)

    def model_time(self, t):
        """The timestep the UNet is told: t itself."""
        return t

    def invert(self, predict, x0, t, args):
        """ReNoise inversion of x0 to t; ``predict(z, model_t, index)`` is the network's raw output.

        Returns (noisy, noise) with ``add_noise(x0, noise, t) == noisy``.
        """
        def eps_fn(z, step_t, index):
            return epsilon_from_prediction(predict(z, step_t, index), z, step_t, self.alphas_cumprod,
                                           self.prediction_type)

        return renoise_inversion(eps_fn, x0, t, self.alphas_cumprod, args.num_inversion_steps,
                                 args.num_renoise_steps, args.inversion_schedule, self.steps_offset)

    def to(self, device):
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    def context(self):
        """What metrics.jsonl records about the process."""
        return {"prediction_type": self.prediction_type, "steps_offset": self.steps_offset}


@dataclass
class RectifiedFlow:
    """A rectified-flow process: the training scheduler's (shifted) sigmas and diffusers' timestep density.

    ``sigmas`` (T,) are ``FlowMatchEulerDiscreteScheduler(...).sigmas`` (descending, shift applied);
    a training sigma is ``sigmas[int(u * T)]`` with u drawn from ``weighting_scheme``, as diffusers'
    train_dreambooth_sd3.py draws it. ``time_scale``: the network is told ``s * time_scale`` (1000 for
    SD3, whose transformer takes the scheduler's timesteps; 1 for FLUX).
    """

    sigmas: torch.Tensor
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    time_scale: float = 1000.0
    shift: float = 1.0

    @classmethod
    def from_pipeline(cls, args, time_scale):
        """From --pretrained_model_name_or_path's FlowMatchEulerDiscreteScheduler and the --weighting_scheme flags."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = FlowMatchEulerDiscreteScheduler.load_config(args.pretrained_model_name_or_path, subfolder="scheduler",
                                                             revision=args.revision)
        return cls.from_scheduler_config(config, args, time_scale)

    @classmethod
    def from_scheduler_config(cls, config, args, time_scale):
        """From a FlowMatchEulerDiscreteScheduler config and the --weighting_scheme flags."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        # a dynamically shifting scheduler (FLUX) shifts at inference only: its training sigmas are unshifted
        shift = 1.0 if scheduler.config.use_dynamic_shifting else scheduler.config.shift
        return cls(scheduler.sigmas.float(), args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale,
                   time_scale, shift)

    def draw_timesteps(self, num_pairs, generator, conditioning=None):
        """One sigma per pair on the CPU, as diffusers' SD3 / FLUX training scripts draw it."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(self.weighting_scheme, num_pairs, self.logit_mean, self.logit_std,
                                                  self.mode_scale, device=generator.device, generator=generator)
        index = (u * len(self.sigmas)).long().clamp(max=len(self.sigmas) - 1)
        return self.sigmas.cpu()[index]

    @staticmethod
    def _s(t, like):
        return t.to(like.device, torch.float32).view(-1, *[1] * (like.dim() - 1))

    def add_noise(self, x0, noise, t):
        """x_s = (1 - s) x0 + s eps."""
        s = self._s(t, x0)
        return (1.0 - s) * x0.float() + s * noise.float()

    def target(self, x0, noise, t):
        """The velocity v = eps - x0 (diffusers: ``noise - model_input``)."""
        return noise.float() - x0.float()

    def noise_from(self, x0, noisy, t):
        """The noise that lands an x0 at ``noisy``: eps = (x_s - (1 - s) x0) / s."""
        s = self._s(t, x0)
        return (noisy.float() - (1.0 - s) * x0.float()) / s

    def model_time(self, t):
        """What the transformer is told: s * time_scale."""
        return t * self.time_scale

    def invert(self, predict, x0, t, args):
        """Euler + ReNoise inversion from s = 0 to each sample's s (``smpo.renoise.flow_inversion``).

        Returns (noisy, noise) with ``add_noise(x0, noise, t) == noisy``.
        """
        def v_fn(z, sigma, index):
            return predict(z, self.model_time(sigma), index)

        noisy = flow_inversion(v_fn, x0, t, args.num_inversion_steps, args.num_renoise_steps)
        return noisy, self.noise_from(x0, noisy, t)

    def to(self, device):
        return self  # sigmas are drawn on the CPU

    def context(self):
        return {"process": "rectified_flow", "shift": self.shift, "weighting_scheme": self.weighting_scheme,
                "time_scale": self.time_scale}

    def mean_squared_one_minus_sigma(self, num_samples=200_000, seed=0):
        """E[(1 - s)^2] under this timestep density (Monte Carlo, fixed seed): the beta conversion factor."""
        s = self.draw_timesteps(num_samples, torch.Generator().manual_seed(seed))
        return float(((1.0 - s.double()) ** 2).mean())


def add_flow_flags(parser, lora_target_modules=None, logit_mean=0.0, logit_std=1.0, mode_scale=1.29):
    """The timestep-density flags of diffusers' SD3 / FLUX training scripts (same names and defaults), and their
    --lora_layers when the family's default ``lora_target_modules`` are given."""
    a = parser.add_argument
    if lora_target_modules is not None:
        a("--lora_layers", default=None, help="Comma-separated transformer modules to train LoRA on (default: "
                                              + ",".join(lora_target_modules) + ").")
    a("--weighting_scheme", default="logit_normal", choices=list(WEIGHTING_SCHEMES),
      help="Density of the training sigmas (diffusers' compute_density_for_timestep_sampling); the sigma is "
           "then read off the scheduler's shifted sigmas. No loss weighting: DPO compares raw velocity errors.")
    a("--logit_mean", type=float, default=logit_mean, help="Mean of the logit_normal density.")
    a("--logit_std", type=float, default=logit_std, help="Std of the logit_normal density.")
    a("--mode_scale", type=float, default=mode_scale, help="Scale of the mode density.")


def check_flow_args(args, family="a flow model"):
    """Refuse the SD-only flags on a flow model (``family``: its name in the messages), each with one sentence
    naming the fix."""
    if args.inversion_schedule != "exact":
        raise SystemExit(f"--inversion_schedule {args.inversion_schedule} replays the SD authors' DDIM grid and has no "
                         "meaning for a flow model: use --inversion_schedule exact (the default).")
    if getattr(args, "unet_init", None):
        raise SystemExit(f"--unet_init loads a UNet: {family} trains its transformer; drop --unet_init.")


def converted_beta(beta_eps, process):
    """beta_v = beta_eps * E[(1 - s)^2]: the flow beta matching an epsilon-DPO beta on average (method notes 8)."""
    return beta_eps * process.mean_squared_one_minus_sigma()


def flow_sigmas(shift, num_train_timesteps=1000):
    """FlowMatchEulerDiscreteScheduler's training sigmas for ``shift`` (without building a scheduler)."""
    s = torch.linspace(1, num_train_timesteps, num_train_timesteps).flip(0) / num_train_timesteps
    return shift * s / (1 + (shift - 1) * s)

