"""Training objectives: each one defined once, with everything that belongs to it.

An :class:`Objective` holds its loss (a pure function of the denoising errors, :mod:`smpo.losses`),
which labels it learns from (reward scores or human labels: what the data must hold and how pairs
are ordered), whether it needs the loser and the reference at all, the noise it trains with by
default, and the words the model card uses for it. ``--loss_type`` chooses one by name from the
dict a script passes in (:data:`OBJECTIVES` unless it adds its own: see
``examples/custom_objective.py``).
"""

from dataclasses import dataclass
from typing import Callable

from .losses import hinge_loss, ipo_loss, preference_loss, sft_loss


@dataclass(frozen=True)
class Objective:
    """One ``--loss_type``.

    loss: for pair objectives ``loss(m_w, m_l, r_w, r_l, weight, beta) -> (loss, implicit_acc)`` on the
        per-pair denoising errors of the policy (m) and the reference (r), winner (w) and loser (l);
        for ``winners_only`` objectives ``loss(m_w) -> loss``.
    labels: ``"reward"``: the reward scores (``reward_score_0/1``) choose the winner and the smoothed
        weight; ``"human"``: ``label_0`` chooses the winner, weight 1, ties (0.5) are dropped.
    noise_source: the default ``--noise_source`` for this objective.
    winners_only: train on the winners alone (no loser, no reference forward).
    card: how the model card names the method ("trained with <card>").
    """

    loss: Callable
    labels: str = "human"
    noise_source: str = "forward"
    winners_only: bool = False
    card: str = ""
    help: str = ""


OBJECTIVES = {
    "smpo": Objective(preference_loss, labels="reward", noise_source="renoise",
                      card="SmPO (reward-smoothed preference weights)",
                      help="reward-smoothed per-pair weights (needs score_pairs.py's scores)"),
    "dpo": Objective(preference_loss, card="Diffusion-DPO (binary human labels)",
                     help="Diffusion-DPO on the human labels ('sigmoid' is the diffusers name)"),
    "hinge": Objective(hinge_loss, card="Diffusion-DPO with the hinge loss (binary human labels)",
                       help="the diffusers DPO script's hinge loss, relu(1 - inside)"),
    "ipo": Objective(ipo_loss, card="IPO (binary human labels)",
                     help="the diffusers DPO script's IPO loss, (logits - 1/beta)^2"),
    "sft": Objective(sft_loss, winners_only=True, card="supervised fine-tuning on the preferred images",
                     help="the plain denoising loss on the winners"),
}
# Accepted so that a diffusers train_diffusion_dpo*.py command line works unchanged.
ALIASES = {"sigmoid": "dpo"}
