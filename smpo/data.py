"""Preference pairs: loading, checking, decoding, ordering winner first, and image transforms.

A preference dataset has the Pick-a-Pic v2 columns ``caption``, ``jpg_0``, ``jpg_1`` (encoded image
bytes) and ``label_0`` (1: image 0 preferred, 0: image 1 preferred, 0.5: tie); SmPO also needs
``reward_score_0`` / ``reward_score_1`` written by ``score_pairs.py`` or ``generate_pairs.py`` (in a
``metadata.jsonl`` folder, every key of a line is kept as a column, the scores too). Both training
scripts, ``score_pairs.py`` and ``generate_pairs.py`` use this module, so every path through the
project sees the same pairs.
"""

import argparse
import io
import logging
import random

import numpy as np
import torch
from PIL import Image

from .labels import DEFAULT_GAMMA, DEFAULT_TEMPERATURE, preference_weight
from .loading import PreferenceDataError, load_preference_dataset  # noqa: F401 (part of this API)

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("jpg_0", "jpg_1")
LABEL_COLUMN = "label_0"
SCORE_COLUMNS = ("reward_score_0", "reward_score_1")
NOISE_SEED_COLUMNS = ("noise_seed_0", "noise_seed_1")  # generate_pairs.py: each image's initial noise seed


def uses_reward_scores(labels):
    """True when ``labels`` (an objective's ``labels``, or a loss type name) means reward-score labels."""
    return labels in ("reward", "smpo")


def check_columns(column_names, caption_column, labels=None, loss_type=None):
    """Raise a PreferenceDataError naming what is missing and how to fix it.

    ``labels``: ``"reward"`` (the reward scores order the pair), ``"human"`` (``label_0`` does) or None
    (captions and images only, as score_pairs.py needs); the loss type names ``"smpo"`` / ``"dpo"`` /
    ``"sft"`` are accepted for them. ``loss_type`` names the flag value in the messages.
    """
    labels = labels or loss_type
    loss_type = loss_type or labels
    found = sorted(column_names)
    if caption_column not in column_names:
        raise PreferenceDataError(
            f"caption column '{caption_column}' not found; the dataset has columns {found}. "
            "Set --caption_column."
        )
    missing = [c for c in IMAGE_COLUMNS if c not in column_names]
    if missing:
        raise PreferenceDataError(
            f"image columns {missing} not found; the dataset has columns {found}. A preference dataset "
            "needs jpg_0 and jpg_1 (encoded images) as in Pick-a-Pic v2."
        )
    if uses_reward_scores(labels) and not all(c in column_names for c in SCORE_COLUMNS):
        raise PreferenceDataError(
            f"--loss_type {loss_type} needs reward scores in columns {list(SCORE_COLUMNS)}; the dataset has "
            f"columns {found}. Run score_pairs.py on it first (python score_pairs.py --dataset_name ... "
            "--output_dir SCORED) and train on SCORED, or use --loss_type dpo for human labels."
        )
    if labels is not None and not uses_reward_scores(labels) and LABEL_COLUMN not in column_names:
        raise PreferenceDataError(
            f"--loss_type {loss_type} needs the human label column '{LABEL_COLUMN}'; the dataset has "
            f"columns {found}."
        )


def select_pairs(dataset, labels, max_train_samples=None, seed=None, drop_human_ties=False):
    """Row indices to train on, and the rows left out, by reason: ``{reason: [row, ...]}``.

    ``labels`` as in :func:`check_columns`. Human labels (dpo, sft, ...): ties (label_0 = 0.5) carry no binary preference and are dropped.
    Reward scores (smpo): pairs with a NaN/inf reward score are dropped; ties in the human label do not matter
    since the reward model decides, unless ``drop_human_ties`` (the authors' data selection) leaves
    them out too. ``max_train_samples`` keeps a seeded random subset, like the diffusers scripts.
    """
    num_rows = len(dataset)
    keep = np.ones(num_rows, dtype=bool)
    dropped = {}
    reward = uses_reward_scores(labels)
    if reward:
        scores = np.stack([np.asarray(dataset[c], dtype=np.float64) for c in SCORE_COLUMNS], axis=1)
        bad = ~np.isfinite(scores).all(axis=1)
        dropped["non-finite reward score"] = np.flatnonzero(bad).tolist()
        keep &= ~bad
    if reward and drop_human_ties:
        if LABEL_COLUMN not in dataset.column_names:
            raise PreferenceDataError(f"--drop_human_ties needs the human label column '{LABEL_COLUMN}'; the "
                                      f"dataset has {dataset.column_names}")
        tie = np.asarray(dataset[LABEL_COLUMN], dtype=np.float64) == 0.5
        dropped["human tie (label_0 = 0.5, --drop_human_ties)"] = np.flatnonzero(tie & keep).tolist()
        keep &= ~tie
    elif not reward:
        labels = np.asarray(dataset[LABEL_COLUMN], dtype=np.float64)
        tie = labels == 0.5
        invalid = ~(tie | (labels == 0) | (labels == 1))
        if invalid.any():
            rows = np.flatnonzero(invalid)[:10].tolist()
            raise PreferenceDataError(f"column {LABEL_COLUMN} must be 0, 0.5 or 1; rows {rows} are not.")
        dropped["tie (label_0 = 0.5)"] = np.flatnonzero(tie).tolist()
        keep &= ~tie
    rows = np.flatnonzero(keep)
    if max_train_samples is not None and max_train_samples < len(rows):
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.permutation(rows)[:max_train_samples])
    if len(rows) == 0:
        counts = {why: len(rows) for why, rows in dropped.items()}
        raise PreferenceDataError(f"no pairs left to train on out of {num_rows} (dropped: {counts}).")
    return rows.tolist(), dropped


class PairDataset(torch.utils.data.Dataset):
    """The selected rows of a preference dataset; each item remembers its row index."""

    def __init__(self, dataset, rows):
        self.dataset, self.rows = dataset, list(rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        return {"row": row, **self.dataset[row]}


# ---------------------------------------------------------------------------------- decoding
class UnreadableImageError(ValueError):
    """An image that cannot be decoded (missing, empty, corrupt, truncated): the one error that drops a pair."""


# What PIL raises for such data: UnidentifiedImageError (an OSError) for empty or garbage bytes, OSError for
# truncated data or a missing file, SyntaxError for some broken chunks, DecompressionBombError for a huge image.
PIL_DECODING_ERRORS = (OSError, SyntaxError, Image.DecompressionBombError)


def open_image(value, column=None):
    """An RGB PIL image from encoded bytes, a datasets Image dict, a file path or a PIL image.

    Raises UnreadableImageError (naming ``column``) when there is no image or it cannot be decoded.
    """
    where = f" in {column}" if column else ""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if not isinstance(value, Image.Image) and not value:  # None, b"", ""
        raise UnreadableImageError(f"unreadable image{where} (there is none)")
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, str):
            image = Image.open(value)
        else:
            raise TypeError(f"cannot read an image{where} from a {type(value).__name__}")
        image.load()  # decode now, so truncated data fails here and not later
        return image.convert("RGB")
    except PIL_DECODING_ERRORS as err:
        raise UnreadableImageError(f"unreadable image{where} ({type(err).__name__}: {err})") from err


def add_bad_pair_flag(parser):
    """--max_bad_pair_fraction, the limit :func:`check_bad_pairs` applies (training and score_pairs.py)."""
    def fraction(text):
        if not 0.0 <= float(text) <= 1.0:
            raise argparse.ArgumentTypeError(f"must be in [0, 1], not {text}")
        return float(text)

    parser.add_argument("--max_bad_pair_fraction", type=fraction, default=0.01,
                        help="Stop when more than this fraction of the pairs have an unreadable image (each such "
                             "pair is left out whole and logged with its row).")


def check_bad_pairs(bad_rows, num_pairs, max_fraction, dataset_name, num_bad=None):
    """Stop (SystemExit) when more than ``max_fraction`` of ``num_pairs`` pairs have an unreadable image.

    ``bad_rows``: the rows known here; ``num_bad``: the count when it is larger (other processes' rows).
    """
    num_bad = len(bad_rows) if num_bad is None else num_bad
    if num_bad > max_fraction * num_pairs:
        raise SystemExit(
            f"{num_bad} of {num_pairs} pairs of {dataset_name} have an unreadable image (rows "
            f"{sorted(bad_rows)[:20]} among them), more than --max_bad_pair_fraction {max_fraction} allows: the "
            "data is probably broken. Fix or remove those rows, or raise --max_bad_pair_fraction to leave them out.")


# -------------------------------------------------------------------------------- transforms
class PairTransform:
    """Resize (shorter side), crop to a square and flip both images of a pair.

    Each image keeps its own original size and gets its own crop (the two may differ in size);
    the flip is shared by the pair. Random choices come from ``rng`` so they are reproducible.
    Returns per image: a (3, R, R) tensor in [-1, 1], the original (height, width) and the crop's
    (top, left), which SDXL's micro-conditioning needs.
    """

    def __init__(self, resolution, random_crop=False, hflip=True):
        self.resolution, self.random_crop, self.hflip = resolution, random_crop, hflip

    def __call__(self, images, rng):
        flip = self.hflip and rng.random() < 0.5
        return [self._one(image, flip, rng) for image in images]

    def _one(self, image, flip, rng):
        res = self.resolution
        original_size = (image.height, image.width)
        scale = res / min(image.width, image.height)
        width, height = max(res, round(image.width * scale)), max(res, round(image.height * scale))
        image = image.resize((width, height), Image.BILINEAR)
        if self.random_crop:
            top, left = rng.randint(0, height - res), rng.randint(0, width - res)
        else:
            top, left = (height - res) // 2, (width - res) // 2
        image = image.crop((left, top, left + res, top + res))
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            left = width - res - left  # the crop as seen in the flipped image
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
        return pixels, original_size, (top, left)


# ----------------------------------------------------------------------------------- collate
class PreferenceCollator:
    """Turn rows into a training batch with the winner of every pair first.

    The batch holds ``pixel_values`` (2B, 3, R, R): the B winners, then the B losers;
    ``original_sizes`` and ``crop_top_lefts`` (2B, 2) in the same order; ``captions`` (B);
    ``weight`` (B,): the smoothed preference weight (smpo) or 1 (dpo, sft); ``rows`` (B,).
    With a ``latent_cache``, ``latent_mean`` and ``latent_std`` (2B, C, h, w) replace ``pixel_values``.
    Rows that record their initial noise (generate_pairs.py) add ``noise_seeds`` (2B,) and ``noise_shapes``
    (2B, 3) in the same winner-then-loser order (see :func:`noise_columns`).

    ``labels`` as in :func:`check_columns`: reward scores choose the winner and weight
    (``smpo.labels.preference_weight``), or the human label chooses the winner (ties were removed by
    ``select_pairs``). A pair with an unreadable image is dropped whole and logged with its row, and
    listed in the batch's ``bad_rows`` (a batch with no readable pair holds only ``bad_rows``): the list
    travels with the batch, so it reaches the training loop from DataLoader worker processes too.
    """

    def __init__(self, transform, labels, caption_column="caption", temperature=DEFAULT_TEMPERATURE,
                 gamma=DEFAULT_GAMMA, proportion_empty_prompts=0.0, seed=0, latent_cache=None):
        self.transform, self.labels, self.caption_column = transform, labels, caption_column
        self.temperature, self.gamma = temperature, gamma
        self.proportion_empty_prompts, self.seed = proportion_empty_prompts, seed
        self.latent_cache = latent_cache  # smpo.cache.LatentCache: cached latents instead of images
        self.epoch = 0

    def winner_and_weight(self, examples):
        if uses_reward_scores(self.labels):
            score_0 = torch.tensor([float(e[SCORE_COLUMNS[0]]) for e in examples])
            score_1 = torch.tensor([float(e[SCORE_COLUMNS[1]]) for e in examples])
            return preference_weight(score_0, score_1, self.temperature, self.gamma)
        image_0_wins = torch.tensor([float(e[LABEL_COLUMN]) == 1.0 for e in examples])
        return image_0_wins, torch.ones(len(examples))

    def load_pair(self, example, rng):
        """Per image of the pair: (pixels or (latent mean, std)), original size, crop; or raise."""
        if self.latent_cache is not None:
            mean, std, sizes, crops = self.latent_cache.pair(example["row"])
            return [((mean[k], std[k]), tuple(sizes[k].tolist()), tuple(crops[k].tolist())) for k in (0, 1)]
        return self.transform([open_image(example[c], c) for c in IMAGE_COLUMNS], rng)

    def load_pairs(self, examples):
        """([(example, pair, rng), ...] of the readable pairs, [rows of the unreadable ones]), in order."""
        loaded, bad_rows = [], []
        for e in examples:
            rng = random.Random(f"{self.seed}-{self.epoch}-{e['row']}")
            try:
                loaded.append((e, self.load_pair(e, rng), rng))
            except UnreadableImageError as err:  # drops the whole pair; any other error is a bug and surfaces
                bad_rows.append(e["row"])
                logger.warning("dropping pair at row %d: %s", e["row"], err)
        return loaded, bad_rows

    def __call__(self, examples):
        loaded, bad_rows = self.load_pairs(examples)
        if not loaded:
            return {"bad_rows": bad_rows}
        examples = [e for e, _, _ in loaded]
        image_0_wins, weight = self.winner_and_weight(examples)

        winners, losers, captions = [], [], []
        for (example, pair, rng), zero_wins in zip(loaded, image_0_wins.tolist()):
            winners.append(pair[0] if zero_wins else pair[1])
            losers.append(pair[1] if zero_wins else pair[0])
            caption = example[self.caption_column]
            if self.proportion_empty_prompts and rng.random() < self.proportion_empty_prompts:
                caption = ""
            captions.append(caption if isinstance(caption, str) else str(caption))
        both = winners + losers
        batch = {
            "original_sizes": torch.tensor([s for _, s, _ in both]),
            "crop_top_lefts": torch.tensor([c for _, _, c in both]),
            "captions": captions,
            "weight": weight.float(),
            "rows": torch.tensor([e["row"] for e in examples]),
            "bad_rows": bad_rows,
        }
        batch.update(noise_columns(examples, image_0_wins))
        if self.latent_cache is not None:
            batch["latent_mean"] = torch.stack([m for (m, _), _, _ in both])
            batch["latent_std"] = torch.stack([s for (_, s), _, _ in both])
        else:
            batch["pixel_values"] = torch.stack([p for p, _, _ in both])
        return batch


def noise_columns(examples, image_0_wins):
    """``noise_seeds`` (2B,) and ``noise_shapes`` (2B, 3), winners then losers, of rows that record them, else {}."""
    if not all(c in examples[0] for c in (*NOISE_SEED_COLUMNS, "noise_shape")):
        return {}
    zero_wins = image_0_wins.tolist()
    seeds = [[e[c] for c in NOISE_SEED_COLUMNS] for e in examples]
    winners = [s[0] if w else s[1] for s, w in zip(seeds, zero_wins)]
    losers = [s[1] if w else s[0] for s, w in zip(seeds, zero_wins)]
    shapes = [list(e["noise_shape"]) for e in examples] * 2  # both images of a pair have the same shape
    return {"noise_seeds": torch.tensor(winners + losers, dtype=torch.int64), "noise_shapes": torch.tensor(shapes)}


def describe_drops(dropped, total):
    """One log line for what select_pairs left out, naming the first rows of each reason."""
    parts = [f"{len(rows)} {why} (rows {rows[:10]}{' ...' if len(rows) > 10 else ''})"
             for why, rows in dropped.items() if rows]
    return f"training on {total} pairs" + (f"; dropped {', '.join(parts)}" if parts else "")
