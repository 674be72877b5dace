"""smpo.labels.preference_weight: winner and smoothed weight from two reward scores (method notes, section 2)."""

import math

import numpy as np
import pytest
import torch

from smpo.labels import DEFAULT_GAMMA, DEFAULT_TEMPERATURE, PICKSCORE_MAX, PICKSCORE_MIN, preference_weight


def weight_of_gap(gap, **kwargs):
    """Weight of a pair whose image 0 scores `gap` above image 1 (scores around a PickScore-like 0.2)."""
    wins, weight = preference_weight(torch.tensor([0.2 + gap]), torch.tensor([0.2]), **kwargs)
    assert wins.item() == (gap >= 0)
    return weight.item()


def test_defaults_are_the_authors_pickscore_normalisation_and_gamma_10():
    assert DEFAULT_TEMPERATURE == pytest.approx(0.28201571106910706 - 0.11543526500463486, abs=1e-15)
    assert DEFAULT_TEMPERATURE == pytest.approx(0.16658, abs=1e-5)
    assert PICKSCORE_MAX - PICKSCORE_MIN == DEFAULT_TEMPERATURE
    assert DEFAULT_GAMMA == 10.0


@pytest.mark.parametrize("gap, expected", [
    (0.01, 0.30),    # PickScore gap of 1 point (x100)
    (0.0334, 1.0),   # 3.34 points: the strength of a binary Diffusion-DPO label
    (0.10, 2.92),    # 10 points
])
def test_weight_sizes_from_the_method_notes(gap, expected):
    assert weight_of_gap(gap) == pytest.approx(expected, abs=0.01)


def test_the_notes_maximum_4_62_is_the_gap_of_the_whole_normalisation_range():
    # at gap = tau: p0 = sigmoid(1) = 0.7310585786, weight = 10 * (2 * 0.7310585786 - 1) = 4.621171573: the
    # "maximum possible" of the notes is for scores inside the authors' min-max range [PICKSCORE_MIN,
    # PICKSCORE_MAX], not for arbitrary cosines.
    wins, weight = preference_weight(torch.tensor([PICKSCORE_MAX]), torch.tensor([PICKSCORE_MIN]))
    assert wins.item()
    assert weight.item() == pytest.approx(4.621171573, abs=1e-5)


# The documented definition, worked by hand: gaps of tau * ln(k) give p0 = sigmoid(ln k) = k / (k + 1), so
# p_winner and gamma * (2 p_winner - 1) are exact fractions.
@pytest.mark.parametrize("tau, gamma", [(DEFAULT_TEMPERATURE, 10.0), (0.05, 3.0), (1.0, 1.0)])
@pytest.mark.parametrize("k, p_winner, weight_over_gamma", [
    (1.0, 0.5, 0.0),    # equal scores
    (3.0, 0.75, 0.5),   # 2 * 0.75 - 1
    (4.0, 0.8, 0.6),
    (9.0, 0.9, 0.8),
    (99.0, 0.99, 0.98),
])
def test_weight_is_gamma_times_2p_minus_1_of_the_sigmoid_of_the_gap_over_tau(tau, gamma, k, p_winner,
                                                                             weight_over_gamma):
    assert 1 / (1 + math.exp(-math.log(k))) == pytest.approx(p_winner, abs=1e-12)  # the hand-computed p
    gap = tau * math.log(k)
    for s0, s1, image_0_wins in [(0.5 + gap, 0.5, True), (0.5, 0.5 + gap, k == 1.0)]:  # either image winning
        wins, weight = preference_weight(torch.tensor([s0], dtype=torch.float64), torch.tensor([s1], dtype=torch.float64),
                                         temperature=tau, gamma=gamma)
        assert wins.item() == image_0_wins
        assert weight.item() == pytest.approx(gamma * weight_over_gamma, abs=2e-5 * gamma)


def test_weight_grows_with_the_gap_and_stays_in_0_gamma_over_cosine_scores():
    # Cosine similarities lie in [-1, 1]: gaps up to 2.
    gaps = np.concatenate([[0.0], np.geomspace(1e-4, 2.0, 60)])
    weights = np.array([weight_of_gap(float(g)) for g in gaps])
    assert weights[0] == 0.0
    assert np.all(np.diff(weights) > 0)
    assert np.all(weights >= 0) and np.all(weights < DEFAULT_GAMMA)
    assert weights[-1] > 9.99  # close to gamma for the largest possible gap


def test_weight_scales_linearly_with_gamma():
    s0, s1 = torch.tensor([0.25, 0.18]), torch.tensor([0.21, 0.24])
    _, w10 = preference_weight(s0, s1, gamma=10.0)
    _, w3 = preference_weight(s0, s1, gamma=3.0)
    assert torch.allclose(w3, w10 * 0.3, rtol=1e-6)


def test_equal_scores_give_exactly_zero_weight():
    s = torch.tensor([0.0, 0.2134, -0.7, 1.0])
    wins, weight = preference_weight(s, s.clone())
    assert torch.equal(weight, torch.zeros(4))
    assert wins.all()  # image 0 is the winner of an exact tie


def test_swapping_scores_flips_the_winner_and_keeps_the_weight():
    s0 = torch.tensor([0.25, 0.19, 0.2201, 0.30])
    s1 = torch.tensor([0.21, 0.24, 0.2200, 0.12])
    wins, weight = preference_weight(s0, s1)
    wins_swapped, weight_swapped = preference_weight(s1, s0)
    assert wins.tolist() == [True, False, True, True]
    assert torch.equal(wins_swapped, ~wins)
    # fp32 sigmoid near 1/2 leaves ~1e-6 absolute error in 2p - 1 (relative 4e-4 at a 1e-4 gap)
    assert torch.allclose(weight_swapped, weight, rtol=1e-6, atol=1e-5)
    assert torch.all(weight > 0)


def test_vectorised_over_pairs_with_mixed_winners_equals_pair_by_pair():
    g = torch.Generator().manual_seed(0)
    s0 = 0.2 + 0.05 * torch.randn(16, generator=g)
    s1 = 0.2 + 0.05 * torch.randn(16, generator=g)
    wins, weight = preference_weight(s0, s1)
    assert wins.shape == (16,) and weight.shape == (16,)
    assert 0 < int(wins.sum()) < 16  # both winners occur
    for i in range(16):
        w_i, weight_i = preference_weight(s0[i:i + 1], s1[i:i + 1])
        assert w_i.item() == wins[i].item() == bool(s0[i] >= s1[i])
        assert weight_i.item() == pytest.approx(weight[i].item(), abs=1e-7)
    assert len(set(weight.tolist())) == 16  # one weight per pair, not one for the batch


@pytest.mark.parametrize("make", [
    lambda v: torch.tensor(v, dtype=torch.float64),
    lambda v: torch.tensor(v, dtype=torch.float16),
    lambda v: np.asarray(v, dtype=np.float64),
    lambda v: list(v),
])
def test_output_dtypes_are_bool_and_float32(make):
    wins, weight = preference_weight(make([0.3, 0.1]), make([0.2, 0.25]))
    assert wins.dtype == torch.bool and weight.dtype == torch.float32
    assert wins.tolist() == [True, False]
    assert torch.all(weight > 0)
