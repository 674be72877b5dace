"""--cache_latents and --cache_text_embeddings: encode once, before training, then train from disk.

Latents: one pass over the training pairs encodes both images of each pair with the VAE and
stores the posterior's mean and std (training still draws a fresh sample from it every step, as
without the cache). The transform must then be deterministic: center crops, no flips. Text: each
unique caption (and the empty prompt) is encoded once. Both caches live in a folder next to the
dataset's own cache files (or in OUTPUT_DIR/smpo-cache when the dataset has none), named by a hash
of everything they depend on, so a second run with the same data and model reuses them.
"""

import hashlib
import json
import os

import torch


def cache_folder(dataset, output_dir):
    """A writable folder next to the dataset's cache files, else OUTPUT_DIR/smpo-cache."""
    files = getattr(dataset, "cache_files", None) or []
    if files:
        folder = os.path.join(os.path.dirname(files[0]["filename"]), "smpo-cache")
        try:
            os.makedirs(folder, exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder
        except OSError:
            pass
    folder = os.path.join(output_dir, "smpo-cache")
    os.makedirs(folder, exist_ok=True)
    return folder


def cache_key(*parts):
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


@torch.no_grad()
def build_latent_cache(path, pairs, collator, vae, batch_size):
    """Encode both images of every pair of ``pairs`` (a PairDataset); write mean, std, sizes, crops.

    The pairs are read by the training collator's own ``load_pairs`` (the same decoding, transform and
    bad-pair handling as training without the cache): a pair with an unreadable image is left out
    whole and listed under ``bad_rows``. Every process applies --max_bad_pair_fraction to them when it
    reads the cache (:func:`smpo.inputs.load_latent_cache`), so nothing here stops the main process alone.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    means, stds, sizes, crops, rows, bad_rows = [], [], [], [], [], []
    per_call = max(1, batch_size // 2)  # pairs per VAE call: two images each
    for start in tqdm(range(0, len(pairs), per_call), desc="caching latents"):
        loaded, bad = collator.load_pairs([pairs[i] for i in range(start, min(start + per_call, len(pairs)))])
        bad_rows.extend(bad)
        if not loaded:
            continue
        pixels = torch.stack([p for _, pair, _ in loaded for p, _, _ in pair])
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean.cpu().unflatten(0, (-1, 2)))
        stds.append(dist.std.cpu().unflatten(0, (-1, 2)))
        sizes.extend([s for _, s, _ in pair] for _, pair, _ in loaded)
        crops.extend([c for _, _, c in pair] for _, pair, _ in loaded)
        rows.extend(e["row"] for e, _, _ in loaded)
    none = [torch.zeros(0)]  # no readable pair: written all the same, every process stops when it reads the cache
    tensors = {"mean": torch.cat(means or none).contiguous(), "std": torch.cat(stds or none).contiguous(),
               "original_sizes": torch.tensor(sizes), "crop_top_lefts": torch.tensor(crops),
               "rows": torch.tensor(rows), "bad_rows": torch.tensor(bad_rows, dtype=torch.long)}
    save_file(tensors, path + ".tmp")
    os.replace(path + ".tmp", path)


class LatentCache:
    """Read access to a latent cache by dataset row."""

    def __init__(self, path):
        from safetensors.torch import load_file

        tensors = load_file(path)
        self.mean, self.std = tensors["mean"], tensors["std"]
        self.sizes, self.crops = tensors["original_sizes"], tensors["crop_top_lefts"]
        self.index = {row: i for i, row in enumerate(tensors["rows"].tolist())}
        self.bad_rows = tensors["bad_rows"].tolist()

    def pair(self, row):
        """(mean, std, original sizes, crops) of images 0 and 1 of a row, each stacked (2, ...)."""
        i = self.index[row]
        return self.mean[i], self.std[i], self.sizes[i], self.crops[i]


@torch.no_grad()
def build_text_cache(path, captions, encode, batch_size=64):
    """Encode each caption once with ``encode(list_of_captions) -> tensor or tuple of tensors``."""
    from tqdm.auto import tqdm

    captions = sorted(set(captions))
    parts = []
    for start in tqdm(range(0, len(captions), batch_size), desc="caching text embeddings"):
        out = encode(captions[start:start + batch_size])
        parts.append(tuple(o.cpu() for o in (out if isinstance(out, tuple) else (out,))))
    tensors = tuple(torch.cat(group) for group in zip(*parts))
    torch.save({"captions": captions, "tensors": tensors}, path + ".tmp")
    os.replace(path + ".tmp", path)


class TextCache:
    """Caption -> cached embeddings, moved to ``device`` in the batch."""

    def __init__(self, path, device):
        data = torch.load(path, weights_only=True)
        self.index = {c: i for i, c in enumerate(data["captions"])}
        self.tensors = tuple(t.to(device) for t in data["tensors"])

    def __call__(self, captions):
        idx = torch.tensor([self.index[c] for c in captions], device=self.tensors[0].device)
        out = tuple(t[idx] for t in self.tensors)
        return out if len(out) > 1 else out[0]
