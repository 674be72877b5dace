"""SmPO: Smoothed Preference Optimization via ReNoise Inversion (ICML 2025).

The whole method lives in three pure functions:

- :func:`smpo.labels.preference_weight` turns two reward-model scores into a winner and a
  smoothed per-pair weight,
- :func:`smpo.renoise.renoise_inversion` finds the noisy latent the model itself would pass
  through at timestep t (instead of random forward noise),
- :func:`smpo.losses.preference_loss` is the weighted Diffusion-DPO objective (with the diffusers
  DPO variants ``hinge_loss`` and ``ipo_loss`` beside it).

:mod:`smpo.objectives` and :mod:`smpo.noise_sources` name them for ``--loss_type`` and
``--noise_source``; :mod:`smpo.processes` holds what differs between diffusion (SD, SDXL) and rectified-flow
(SD3, FLUX) models, which the step, the noise sources and the inversion ask (:func:`smpo.renoise.flow_inversion`
is the flow models' ReNoise); :mod:`smpo.step` is one training step; :func:`smpo.training.train` runs the
rest (see its module docstring for where each job lives). :mod:`smpo.data` loads and pairs the images.
:mod:`smpo.rewards` scores images with a reward model, :mod:`smpo.sampling` samples a pipeline with
the shared seed rule (and :func:`smpo.sampling.initial_noise`, each generated image's recorded noise, which
:mod:`smpo.prior_noise` redraws for ``--noise_source prior``), :mod:`smpo.grid` draws captioned grids (for score_pairs.py, evaluate.py and
generate_pairs.py).
"""

from .labels import preference_weight
from .losses import hinge_loss, ipo_loss, preference_loss, sft_loss
from .notices import drop_known_notices
from .renoise import forward_noise, renoise_inversion

drop_known_notices()  # two library notices every run printed (smpo/notices.py); before diffusers etc. are imported

__all__ = ["preference_weight", "preference_loss", "hinge_loss", "ipo_loss", "sft_loss", "renoise_inversion",
           "forward_noise"]
__version__ = "0.2.0"
