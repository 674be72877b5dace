#!/usr/bin/env python
"""Score both images of every preference pair with a reward model (PickScore by default).

    python score_pairs.py --dataset_name yuvalkirstain/pickapic_v2 --output_dir pickapic_v2-scored

writes the dataset, all columns kept and in the same row order, with two new float columns
``reward_score_0`` and ``reward_score_1``: the cosine similarity of the normalised image and
caption embeddings (no logit scale), which SmPO (``--loss_type smpo``) turns into smoothed
preferences. A pair with an unreadable image is left out whole; its row number (in the input)
is printed and listed in ``OUTPUT_DIR/bad_rows.json``; more of them than ``--max_bad_pair_fraction``
(1% by default, as in training) stop the script, and so does a dataset with no readable pair.
Scoring goes through ``datasets.map``, so rerunning on a dataset stored on disk reuses the cached scores.
"""

import argparse
import json
import os

import numpy as np
import torch

from smpo.data import (IMAGE_COLUMNS, LABEL_COLUMN, SCORE_COLUMNS, UnreadableImageError, add_bad_pair_flag,
                       check_bad_pairs, check_columns, load_preference_dataset, open_image)
from smpo.preflight import missing_path, require, reward_needs
from smpo.rewards import PICKSCORE, default_reward_processor, load_reward_model, reward_scores

UNREADABLE = "_unreadable"
CACHE_VERSION = "score_pairs-v1"  # change when the scores computed for a row change


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_name", required=True,
                        help="hub id, save_to_disk folder, parquet file/folder or metadata.jsonl image folder")
    parser.add_argument("--dataset_split_name", default="train")
    parser.add_argument("--caption_column", default="caption")
    parser.add_argument("--reward_model_name_or_path", default=PICKSCORE)
    parser.add_argument("--reward_processor_name_or_path", default=None,
                        help="default: the model path; for PickScore laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    parser.add_argument("--batch_size", type=int, default=16, help="pairs per batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max_samples", type=int, default=None, help="score only the first N pairs")
    parser.add_argument("--cache_dir", default=None)
    add_bad_pair_flag(parser)
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    if args.reward_processor_name_or_path is None:
        args.reward_processor_name_or_path = default_reward_processor(args.reward_model_name_or_path)
    return args


def score_batch(captions, images_0, images_1, rows, model, processor, device):
    """datasets.map function: scores of each pair, NaN and flagged where an image is unreadable."""
    n = len(rows)
    scores = np.full((2, n), np.nan, dtype=np.float32)
    unreadable = [False] * n
    readable, pair_images = [], []
    for i, (row, value_0, value_1) in enumerate(zip(rows, images_0, images_1)):
        try:
            pair_images.append((open_image(value_0, IMAGE_COLUMNS[0]), open_image(value_1, IMAGE_COLUMNS[1])))
            readable.append(i)
        except UnreadableImageError as err:  # leaves the whole pair out; any other error is a bug and surfaces
            unreadable[i] = True
            print(f"row {row}: {err}; leaving the pair out", flush=True)
    if readable:
        caps = [captions[i] for i in readable]
        for k in (0, 1):
            scores[k, readable] = reward_scores(model, processor, [p[k] for p in pair_images], caps, device).numpy()
    return {SCORE_COLUMNS[0]: scores[0].tolist(), SCORE_COLUMNS[1]: scores[1].tolist(), UNREADABLE: unreadable}


def main(args):
    require([missing_path("--dataset_name", args.dataset_name)] + reward_needs(
        [args.reward_model_name_or_path], [args.reward_processor_name_or_path], args.cache_dir))
    import datasets

    dataset = load_preference_dataset(args.dataset_name, args.dataset_split_name, args.cache_dir)
    needed = [args.caption_column, *IMAGE_COLUMNS]
    check_columns(dataset.column_names, args.caption_column, loss_type=None)
    if args.max_samples is not None:
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))

    model, processor = load_reward_model(args.reward_model_name_or_path, args.reward_processor_name_or_path,
                                         args.device, args.cache_dir)

    # Score on a view of the needed columns (images stay undecoded until open_image) and write only
    # the score columns, so the map cache stays small. The fingerprint names what the scores depend on,
    # instead of datasets hashing the whole reward model.
    view = dataset.select_columns(needed)
    fingerprint = datasets.fingerprint.Hasher.hash(
        [dataset._fingerprint, needed, args.reward_model_name_or_path, args.reward_processor_name_or_path,
         CACHE_VERSION])
    features = datasets.Features({SCORE_COLUMNS[0]: datasets.Value("float32"),
                                  SCORE_COLUMNS[1]: datasets.Value("float32"),
                                  UNREADABLE: datasets.Value("bool")})
    scores = view.map(
        score_batch, batched=True, batch_size=args.batch_size, with_indices=True, input_columns=needed,
        remove_columns=view.column_names, features=features, new_fingerprint=fingerprint,
        fn_kwargs={"model": model, "processor": processor, "device": args.device}, desc="scoring pairs",
    )

    bad_rows = np.flatnonzero(np.asarray(scores[UNREADABLE], dtype=bool)).tolist()
    good_rows = np.flatnonzero(~np.asarray(scores[UNREADABLE], dtype=bool))
    scored = datasets.concatenate_datasets([dataset, scores.remove_columns(UNREADABLE)], axis=1)
    scored = scored.select(good_rows) if bad_rows else scored
    check_bad_pairs(bad_rows, len(dataset), args.max_bad_pair_fraction, args.dataset_name)
    if not len(scored):
        raise SystemExit(f"no readable pair in {args.dataset_name} ({len(dataset)} rows): nothing to write")
    os.makedirs(args.output_dir, exist_ok=True)
    scored.save_to_disk(args.output_dir)
    with open(os.path.join(args.output_dir, "bad_rows.json"), "w") as f:
        json.dump({"bad_rows": bad_rows, "num_rows_in": len(dataset), "num_rows_out": len(scored)}, f)

    s0 = np.asarray(scored[SCORE_COLUMNS[0]], dtype=np.float64)
    s1 = np.asarray(scored[SCORE_COLUMNS[1]], dtype=np.float64)
    print(f"scored {len(scored)} of {len(dataset)} pairs; wrote {args.output_dir}")
    if bad_rows:
        print(f"left out {len(bad_rows)} pairs with an unreadable image, input rows: {bad_rows} (see bad_rows.json)")
    else:
        print("left out 0 pairs")
    print(f"mean |reward_score_0 - reward_score_1|: {np.mean(np.abs(s0 - s1)):.4f}")
    if LABEL_COLUMN in scored.column_names:
        labels = np.asarray(scored[LABEL_COLUMN], dtype=np.float64)
        decided = (labels == 0) | (labels == 1)
        if decided.any():
            agree = ((s0 > s1) == (labels == 1))[decided].mean()
            print(f"reward model agrees with the human label on {agree:.1%} of {int(decided.sum())} non-tie pairs")


if __name__ == "__main__":
    main(parse_args())
