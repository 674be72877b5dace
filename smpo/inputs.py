"""The training data wired for the loop: opened and checked before any model loads, then the
DataLoader with its collator, and the optional latent / text-embedding caches."""

import logging
import os
from dataclasses import dataclass, field

import torch

from .data import (IMAGE_COLUMNS, PairDataset, PairTransform, PreferenceCollator, PreferenceDataError,
                   check_bad_pairs, check_columns, describe_drops, load_preference_dataset, select_pairs)

logger = logging.getLogger("smpo")


@dataclass
class TrainingPairs:
    """The preference dataset, the rows to train on, and the rows left out by reason."""

    dataset: object
    rows: list
    dropped: dict = field(default_factory=dict)


def open_training_pairs(args, objective, seed):
    """Load, check and select the pairs: a dataset that cannot be trained on fails here, in seconds."""
    dataset = load_preference_dataset(args.dataset_name, args.dataset_split_name, args.cache_dir)
    check_columns(dataset.column_names, args.caption_column, objective.labels, args.loss_type)
    rows, dropped = select_pairs(dataset, objective.labels, args.max_train_samples, seed, args.drop_human_ties)
    return TrainingPairs(dataset, rows, dropped)


def make_dataloader(args, pairs, objective, seed, accelerator, vae):
    """The DataLoader over the selected pairs (winner first); with --cache_latents, over the cached latents."""
    transform = PairTransform(args.resolution, args.random_crop, hflip=not args.no_hflip)
    collator = PreferenceCollator(transform, objective.labels, args.caption_column, args.preference_temperature,
                                  args.smoothing_gamma, args.proportion_empty_prompts, seed=seed)
    if args.cache_latents:
        collator.latent_cache = load_latent_cache(args, accelerator, pairs, collator, vae)
        bad = collator.latent_cache.bad_rows  # on every process: all stop together
        check_bad_pairs(bad, len(pairs.rows), args.max_bad_pair_fraction, args.dataset_name)
        pairs.dropped["unreadable image"] = bad
        pairs.rows = sorted(set(pairs.rows) - set(bad))
        if not pairs.rows:
            raise PreferenceDataError(f"no readable pair in {args.dataset_name}: every pair has an unreadable image")
        pairs.dataset = pairs.dataset.remove_columns(list(IMAGE_COLUMNS))  # the images are not read again
    logger.info(describe_drops(pairs.dropped, len(pairs.rows)))
    loader = torch.utils.data.DataLoader(PairDataset(pairs.dataset, pairs.rows), batch_size=args.train_batch_size,
                                         shuffle=True, collate_fn=collator, num_workers=args.dataloader_num_workers)
    return loader, collator


def load_latent_cache(args, accelerator, pairs, collator, vae):
    """Build the latent cache once (main process first), then read it on every process.

    Its name is the dataset's ``datasets`` fingerprint plus everything else the latents depend on.
    """
    from .cache import LatentCache, build_latent_cache, cache_folder, cache_key

    key = cache_key(getattr(pairs.dataset, "_fingerprint", args.dataset_name), pairs.rows,
                    vae.config.get("_name_or_path"), args.revision, args.resolution, vae.dtype, "latents-v1")
    path = os.path.join(cache_folder(pairs.dataset, args.output_dir), f"latents-{key}.safetensors")
    with accelerator.main_process_first():
        if not os.path.exists(path):
            if accelerator.is_main_process:
                build_latent_cache(path, PairDataset(pairs.dataset, pairs.rows), collator, vae,
                                   args.vae_encode_batch_size)
        else:
            logger.info(f"using cached latents {path}")
    return LatentCache(path)


def cache_text_embeddings(args, accelerator, conditioning, pairs):
    """Encode each unique caption once, give the conditioning the cache, move the encoders off the GPU."""
    from .cache import TextCache, build_text_cache, cache_folder, cache_key

    captions = set(pairs.dataset.select(pairs.rows)[args.caption_column])
    if args.proportion_empty_prompts > 0:
        captions.add("")
    key = cache_key(getattr(pairs.dataset, "_fingerprint", args.dataset_name), sorted(captions),
                    args.pretrained_model_name_or_path, args.revision, type(conditioning).__name__,
                    conditioning.text_encoders[0].dtype, "text-v1",
                    *([args.max_sequence_length] if getattr(args, "max_sequence_length", None) else []))
    path = os.path.join(cache_folder(pairs.dataset, args.output_dir), f"text-{key}.pt")
    with accelerator.main_process_first():
        if not os.path.exists(path) and accelerator.is_main_process:
            build_text_cache(path, captions, conditioning.encode_prompts)
    conditioning.text_cache = TextCache(path, accelerator.device)
    for encoder in conditioning.text_encoders:
        encoder.to("cpu")
