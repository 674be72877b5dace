"""Smoothed preference labels from reward-model scores (method notes, section 2)."""

import torch

# PickScore cosine scores are min-max normalised by the authors with these two constants,
# so the temperature that turns a score gap into a probability is their difference.
PICKSCORE_MIN = 0.11543526500463486
PICKSCORE_MAX = 0.28201571106910706
DEFAULT_TEMPERATURE = PICKSCORE_MAX - PICKSCORE_MIN  # 0.16658...
DEFAULT_GAMMA = 10.0


def preference_weight(score_0, score_1, temperature=DEFAULT_TEMPERATURE, gamma=DEFAULT_GAMMA):
    """Winner and smoothed weight of each pair from the reward scores of its two images.

    p0 = sigmoid((score_0 - score_1) / temperature) is the probability that a rater prefers
    image 0. The winner is the image with p >= 0.5 (image 0 on an exact tie), p_w = max(p0, 1 - p0)
    and the weight is gamma * (2 * p_w - 1): 0 for equally good images, approaching gamma for
    clear preferences. Binary human labels correspond to weight 1 (plain Diffusion-DPO).

    Args:
        score_0, score_1: float tensors of shape (B,), one score per image.
    Returns:
        (image_0_wins, weight): a bool tensor (B,) and a float32 tensor (B,).
    """
    score_0 = torch.as_tensor(score_0, dtype=torch.float32)
    score_1 = torch.as_tensor(score_1, dtype=torch.float32)
    image_0_wins = score_0 >= score_1  # p0 >= 0.5
    # 2 * sigmoid(x) - 1 == tanh(x / 2): the same weight, without fp32 rounding near x = 0
    return image_0_wins, gamma * torch.tanh((score_0 - score_1).abs() / (2.0 * temperature))
