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


def sft_loss(model_err_w):
    """Supervised fine-tuning on the winners only: the plain denoising loss."""
    return model_err_w.mean()
