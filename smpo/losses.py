"""The SmPO objective (method notes, section 3): a per-pair weighted Diffusion-DPO loss."""

import torch
import torch.nn.functional as F


def denoising_error(prediction, target):
    """Per-sample mean squared error over all but the batch dimension, in fp32: shape (N,)."""
    return (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, prediction.ndim)))


def denoising_target(noise, latents, timesteps, alphas_cumprod, prediction_type):
    """What the UNet is trained to predict: the noise (epsilon) or the velocity (v_prediction).

    v = sqrt(abar_t) * noise - sqrt(1 - abar_t) * x0, in fp32.
    """
    if prediction_type == "epsilon":
        return noise.float()
    if prediction_type == "v_prediction":
        abar = alphas_cumprod.to(latents.device)[timesteps].float().view(-1, 1, 1, 1)
        return abar.sqrt() * noise.float() - (1.0 - abar).sqrt() * latents.float()
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def preference_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, weight, beta):
    """Smoothed (weighted) Diffusion-DPO loss.

        inside = -0.5 * beta * weight * ((m_w - m_l) - (r_w - r_l))
        loss   = -mean(log sigmoid(inside))

    ``m_*`` are the policy's and ``r_*`` the reference's denoising errors on the winner (w) and
    loser (l) of each pair, all of shape (B,); ``weight`` (B,) is the smoothed preference weight
    (1 everywhere gives Diffusion-DPO, with the -0.5 * beta convention of the SDXL DPO script and
    the authors). A pair with weight 0 contributes log 2 and exactly zero gradient.

    Returns:
        (loss, implicit_acc): the scalar loss and the fraction of pairs whose inside term is
        positive (ties count half), a scalar tensor without gradient.
    """
    model_diff = model_err_w - model_err_l
    ref_diff = ref_err_w - ref_err_l
    inside = -0.5 * beta * weight * (model_diff - ref_diff)
    loss = -F.logsigmoid(inside).mean()
    with torch.no_grad():
        implicit_acc = (inside > 0).float().mean() + 0.5 * (inside == 0).float().mean()
    return loss, implicit_acc


def _logits(model_err_w, model_err_l, ref_err_w, ref_err_l, weight):
    """weight * ((r_w - r_l) - (m_w - m_l)): the diffusers DPO scripts' ``logits`` (ref_diff - model_diff), weighted."""
    return weight * ((ref_err_w - ref_err_l) - (model_err_w - model_err_l))


def _implicit_acc(inside):
    with torch.no_grad():
        return (inside > 0).float().mean() + 0.5 * (inside == 0).float().mean()


def hinge_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, weight, beta):
    """The diffusers SD DPO script's ``hinge`` loss in our -0.5 * beta convention.

    diffusers: ``relu(1 - B * logits)`` with ``logits = ref_diff - model_diff`` and its beta B; its B is
    0.5 * beta here (method notes, section 7), so ``loss = mean(relu(1 - inside))`` with the same
    ``inside = 0.5 * beta * weight * logits`` as :func:`preference_loss`. Returns (loss, implicit_acc).
    """
    inside = 0.5 * beta * _logits(model_err_w, model_err_l, ref_err_w, ref_err_l, weight)
    return torch.relu(1.0 - inside).mean(), _implicit_acc(inside)


def ipo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, weight, beta):
    """The diffusers SD DPO script's ``ipo`` loss in our -0.5 * beta convention.

    diffusers: ``(logits - 1 / (2 * B)) ** 2`` (the script spells B ``args.beta``, a flag it lacks; meant is
    ``--beta_dpo``); with B = 0.5 * beta that is ``mean((weight * logits - 1 / beta) ** 2)``: the log-ratio
    difference is pulled to the margin 1 / beta instead of to infinity. Returns (loss, implicit_acc).
    """
    logits = _logits(model_err_w, model_err_l, ref_err_w, ref_err_l, weight)
    return (logits - 1.0 / beta).pow(2).mean(), _implicit_acc(logits)


def sft_loss(model_err_w):
    """Supervised fine-tuning on the winners only: the plain denoising loss."""
    return model_err_w.mean()
