"""smpo.losses: the weighted Diffusion-DPO objective, the denoising errors and targets (method notes, section 3)."""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from smpo.losses import denoising_error, denoising_target, hinge_loss, ipo_loss, preference_loss, sft_loss


def sd_alphas_cumprod():
    """Stable Diffusion's training schedule (scaled_linear betas 0.00085..0.012, 1000 steps)."""
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod


def softplus(x):
    """-log(sigmoid(x)) written out by hand."""
    return math.log(1.0 + math.exp(-x))


def f64(values, requires_grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)


# ------------------------------------------------------------------------ preference_loss values
def test_loss_and_accuracy_match_hand_computed_values_for_three_pairs():
    beta = 2.0
    m_w, m_l = [0.30, 0.10, 0.50], [0.20, 0.40, 0.50]
    r_w, r_l = [0.25, 0.20, 0.40], [0.25, 0.30, 0.60]
    weight = [1.0, 0.5, 2.0]
    # inside = -0.5 * beta * w * ((m_w - m_l) - (r_w - r_l)), pair by pair:
    #   pair 0: (0.10) - (0.00)  =  0.10 -> -0.5 * 2 * 1.0 *  0.10 = -0.10
    #   pair 1: (-0.30) - (-0.10) = -0.20 -> -0.5 * 2 * 0.5 * -0.20 = +0.10
    #   pair 2: (0.00) - (-0.20) =  0.20 -> -0.5 * 2 * 2.0 *  0.20 = -0.40
    expected_loss = (softplus(-0.10) + softplus(0.10) + softplus(-0.40)) / 3
    # = (log(1 + e^0.1) + log(1 + e^-0.1) + log(1 + e^0.4)) / 3
    assert expected_loss == pytest.approx(
        (math.log(1 + math.exp(0.1)) + math.log(1 + math.exp(-0.1)) + math.log(1 + math.exp(0.4))) / 3)

    loss, acc = preference_loss(f64(m_w), f64(m_l), f64(r_w), f64(r_l), f64(weight), beta)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    assert acc.item() == pytest.approx(1 / 3)  # only pair 1 has inside > 0


def test_loss_matches_hand_computed_value_for_two_pairs_at_paper_beta():
    beta = 2000.0
    # pair 0: model prefers the winner more than the reference does by 1e-4 -> inside = +0.1 * w
    # pair 1: the other way round by 2e-4                                   -> inside = -0.2 * w (w = 0.25: -0.05)
    m_w, m_l, r_w, r_l = [0.1000, 0.3002], [0.1001, 0.3000], [0.2000, 0.5000], [0.2000, 0.5000]
    weight = [3.0, 0.25]
    inside_0 = -0.5 * beta * 3.0 * ((0.1000 - 0.1001) - (0.2000 - 0.2000))  # = +0.3
    inside_1 = -0.5 * beta * 0.25 * ((0.3002 - 0.3000) - (0.5000 - 0.5000))  # = -0.05
    assert inside_0 == pytest.approx(0.3) and inside_1 == pytest.approx(-0.05)
    expected = (math.log(1 + math.exp(-0.3)) + math.log(1 + math.exp(0.05))) / 2

    loss, acc = preference_loss(f64(m_w), f64(m_l), f64(r_w), f64(r_l), f64(weight), beta)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert acc.item() == 0.5


def test_weight_zero_gives_log2_and_exactly_zero_gradient():
    m_w = f64([0.7, 0.1, 0.4], requires_grad=True)
    m_l = f64([0.2, 0.9, 0.4], requires_grad=True)
    r_w, r_l = f64([0.3, 0.3, 0.1]), f64([0.6, 0.2, 0.8])
    loss, acc = preference_loss(m_w, m_l, r_w, r_l, torch.zeros(3, dtype=torch.float64), beta=5000.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-15)
    assert acc.item() == 0.5  # every inside term is exactly 0: all ties
    grad_w, grad_l = torch.autograd.grad(loss, (m_w, m_l))
    assert torch.equal(grad_w, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(grad_l, torch.zeros(3, dtype=torch.float64))


def test_weight_zero_pair_gets_zero_gradient_inside_a_mixed_batch():
    m_w = torch.tensor([0.7, 0.1], requires_grad=True)
    m_l = torch.tensor([0.2, 0.9], requires_grad=True)
    loss, _ = preference_loss(m_w, m_l, torch.tensor([0.3, 0.3]), torch.tensor([0.6, 0.2]),
                              torch.tensor([0.0, 1.0]), beta=10.0)
    grad_w, grad_l = torch.autograd.grad(loss, (m_w, m_l))
    assert grad_w[0].item() == 0.0 and grad_l[0].item() == 0.0
    assert grad_w[1].item() != 0.0 and grad_l[1].item() != 0.0


# ---------------------------------------------------------------- relation to Diffusion-DPO
def random_errors(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=g, dtype=torch.float64) * 0.01 for _ in range(4)]


def test_weight_one_is_diffusion_dpo_with_the_sdxl_half_beta_convention():
    m_w, m_l, r_w, r_l = random_errors(8, seed=0)
    beta = 5000.0
    # diffusers train_diffusion_dpo_sdxl.py / the authors: -0.5 * beta * (model_diff - ref_diff)
    sdxl_dpo = -F.logsigmoid(-0.5 * beta * ((m_w - m_l) - (r_w - r_l))).mean()
    loss, _ = preference_loss(m_w, m_l, r_w, r_l, torch.ones(8, dtype=torch.float64), beta)
    assert torch.allclose(loss, sdxl_dpo, rtol=1e-12, atol=0)
    assert loss.item() != pytest.approx(math.log(2), abs=1e-3)  # the errors do matter here


def test_beta_here_is_twice_the_sd_dpo_scripts_beta():
    """diffusers train_diffusion_dpo.py uses -beta * (...): its beta b is our beta 2b."""
    m_w, m_l, r_w, r_l = random_errors(8, seed=1)
    ones = torch.ones(8, dtype=torch.float64)
    b_sd = 1000.0
    sd_dpo = -F.logsigmoid(-b_sd * ((m_w - m_l) - (r_w - r_l))).mean()
    ours_doubled, _ = preference_loss(m_w, m_l, r_w, r_l, ones, beta=2 * b_sd)
    ours_same, _ = preference_loss(m_w, m_l, r_w, r_l, ones, beta=b_sd)
    assert torch.allclose(ours_doubled, sd_dpo, rtol=1e-12, atol=0)
    assert not torch.allclose(ours_same, sd_dpo, rtol=1e-3, atol=0)


# ----------------------------------------------------------------------------- per-pair weights
def test_batch_loss_is_mean_of_single_pair_losses_each_with_its_own_weight():
    m_w, m_l, r_w, r_l = random_errors(5, seed=2)
    weight = torch.tensor([0.3, 2.0, 0.0, 4.6, 1.0], dtype=torch.float64)
    beta = 2000.0
    batch_loss, _ = preference_loss(m_w, m_l, r_w, r_l, weight, beta)
    singles = [preference_loss(m_w[i:i + 1], m_l[i:i + 1], r_w[i:i + 1], r_l[i:i + 1], weight[i:i + 1], beta)[0]
               for i in range(5)]
    assert torch.allclose(batch_loss, torch.stack(singles).mean(), rtol=1e-12, atol=0)
    # the first pair's weight applied to the whole batch gives a different loss
    first_only, _ = preference_loss(m_w, m_l, r_w, r_l, weight[:1].expand(5), beta)
    assert not torch.allclose(batch_loss, first_only, rtol=1e-3, atol=0)


def test_gradient_of_each_pair_scales_with_its_own_weight():
    beta, n = 100.0, 4
    weight = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)

    # Where the policy and reference agree (inside = 0 for every pair) sigmoid(-inside) = 1/2, so
    # d loss / d m_w_i = +0.5 * beta * w_i * 0.5 / n: exactly proportional to the pair's weight
    # (a larger winner error raises the loss).
    m_w = f64([0.2, 0.4, 0.1, 0.3], requires_grad=True)
    m_l = f64([0.5, 0.1, 0.3, 0.3], requires_grad=True)
    r_w, r_l = m_w.detach().clone(), m_l.detach().clone()
    loss, _ = preference_loss(m_w, m_l, r_w, r_l, weight, beta)
    grad_w, grad_l = torch.autograd.grad(loss, (m_w, m_l))
    expected = 0.25 * beta * weight / n
    assert torch.allclose(grad_w, expected, rtol=1e-12, atol=0)
    assert torch.allclose(grad_l, -expected, rtol=1e-12, atol=0)

    # Anywhere: d loss / d m_w_i = (0.5 * beta * w_i / n) * sigmoid(-inside_i).
    m_w2, m_l2, r_w2, r_l2 = random_errors(n, seed=3)
    m_w2.requires_grad_(True)
    loss, _ = preference_loss(m_w2, m_l2, r_w2, r_l2, weight, beta)
    (grad_w2,) = torch.autograd.grad(loss, (m_w2,))
    inside = -0.5 * beta * weight * ((m_w2.detach() - m_l2) - (r_w2 - r_l2))
    assert torch.allclose(grad_w2, (0.5 * beta * weight / n) * torch.sigmoid(-inside), rtol=1e-10, atol=0)


# ----------------------------------------------------------------------------- implicit accuracy
def test_implicit_accuracy_counts_ties_as_half():
    # inside terms: +, +, exactly 0 (model and reference agree), -
    m_w, m_l = f64([0.1, 0.1, 0.3, 0.5]), f64([0.2, 0.3, 0.1, 0.1])
    r_w, r_l = f64([0.2, 0.2, 0.3, 0.1]), f64([0.2, 0.2, 0.1, 0.2])
    loss, acc = preference_loss(m_w, m_l, r_w, r_l, torch.ones(4, dtype=torch.float64), beta=10.0)
    assert acc.item() == pytest.approx((2 + 0.5) / 4)
    assert not acc.requires_grad
    # a weight-0 pair is a tie as well
    _, acc = preference_loss(m_w, m_l, r_w, r_l, f64([1.0, 0.0, 1.0, 0.0]), beta=10.0)
    assert acc.item() == pytest.approx((1 + 0.5 * 3) / 4)


# ------------------------------------------------------------------------ errors and targets
def test_denoising_error_is_per_sample_mean_square_in_fp32():
    pred = torch.zeros(3, 2, 2, 2, dtype=torch.float16)
    target = torch.stack([torch.full((2, 2, 2), v) for v in (1.0, 2.0, 0.5)]).half()
    target[0, 0, 0, 0] = 3.0  # 7 ones and a 3: mean square (7 + 9) / 8 = 2
    err = denoising_error(pred, target)
    assert err.shape == (3,) and err.dtype == torch.float32
    assert err.tolist() == pytest.approx([2.0, 4.0, 0.25])


def test_sft_loss_is_mean_winner_error():
    m_w = torch.tensor([0.1, 0.4, 0.7], requires_grad=True)
    loss = sft_loss(m_w)
    assert loss.item() == pytest.approx(0.4)
    (grad,) = torch.autograd.grad(loss, (m_w,))
    assert torch.allclose(grad, torch.full((3,), 1 / 3))


def test_epsilon_target_is_the_noise():
    g = torch.Generator().manual_seed(0)
    noise, x0 = torch.randn(2, 4, 8, 8, generator=g).half(), torch.randn(2, 4, 8, 8, generator=g)
    target = denoising_target(noise, x0, torch.tensor([0, 999]), sd_alphas_cumprod(), "epsilon")
    assert target.dtype == torch.float32
    assert torch.equal(target, noise.float())


@pytest.mark.parametrize("timesteps", [[0, 1, 999], [500, 500, 500], [999, 250, 17]])
def test_v_prediction_target_matches_diffusers_get_velocity(timesteps):
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type="v_prediction")
    g = torch.Generator().manual_seed(1)
    noise, x0 = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor(timesteps)
    target = denoising_target(noise, x0, t, scheduler.alphas_cumprod, "v_prediction")
    assert target.dtype == torch.float32
    assert torch.allclose(target, scheduler.get_velocity(x0, noise, t), atol=1e-5)
    # and it is sqrt(abar) * noise - sqrt(1 - abar) * x0, sample by sample
    abar = scheduler.alphas_cumprod[t].double()
    for i in range(3):
        expected = abar[i].sqrt() * noise[i].double() - (1 - abar[i]).sqrt() * x0[i].double()
        assert torch.allclose(target[i].double(), expected, atol=1e-5)
    assert not torch.allclose(target, noise)


def test_unknown_prediction_type_is_rejected():
    with pytest.raises(ValueError, match="sample"):
        denoising_target(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.tensor([3]),
                         sd_alphas_cumprod(), "sample")


# ------------------------------------------------------- the diffusers SD DPO script's hinge and ipo
def test_hinge_and_ipo_match_hand_computed_values_for_three_pairs():
    """The pairs of the first test: inside = -0.5 * beta * w * ((m_w - m_l) - (r_w - r_l)) = [-0.1, +0.1, -0.4]."""
    beta = 2.0
    args = (f64([0.30, 0.10, 0.50]), f64([0.20, 0.40, 0.50]), f64([0.25, 0.20, 0.40]), f64([0.25, 0.30, 0.60]),
            f64([1.0, 0.5, 2.0]), beta)
    loss, acc = hinge_loss(*args)
    assert loss.item() == pytest.approx((1.1 + 0.9 + 1.4) / 3, rel=1e-12)  # relu(1 - inside)
    assert acc.item() == pytest.approx(1 / 3)
    # ipo: logits = w * ((r_w - r_l) - (m_w - m_l)) = [-0.1, +0.1, -0.4], margin 1 / beta = 0.5
    loss, acc = ipo_loss(*args)
    assert loss.item() == pytest.approx((0.6 ** 2 + 0.4 ** 2 + 0.9 ** 2) / 3, rel=1e-12)
    assert acc.item() == pytest.approx(1 / 3)


def test_sigmoid_hinge_and_ipo_equal_the_diffusers_formulas_with_half_our_beta():
    """diffusers (SD script): logits = ref_diff - model_diff; sigmoid -logsigmoid(B logits), hinge relu(1 - B logits),
    ipo (logits - 1 / (2 B))^2. Its B is 0.5 * beta here (our -0.5 * beta convention)."""
    torch.manual_seed(0)
    m_w, m_l, r_w, r_l = (torch.rand(6, dtype=torch.float64) for _ in range(4))
    beta = 2000.0
    B = beta / 2
    logits = (r_w - r_l) - (m_w - m_l)
    ones = torch.ones(6, dtype=torch.float64)
    assert preference_loss(m_w, m_l, r_w, r_l, ones, beta)[0].item() == pytest.approx(
        (-F.logsigmoid(B * logits)).mean().item(), rel=1e-12)
    assert hinge_loss(m_w, m_l, r_w, r_l, ones, beta)[0].item() == pytest.approx(
        torch.relu(1 - B * logits).mean().item(), rel=1e-12)
    assert ipo_loss(m_w, m_l, r_w, r_l, ones, beta)[0].item() == pytest.approx(
        ((logits - 1 / (2 * B)) ** 2).mean().item(), rel=1e-12)
