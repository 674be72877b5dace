"""Opening a preference dataset: a hub id, a ``save_to_disk`` folder, parquet files, or a folder of images
with a ``metadata.jsonl``. Image columns stay undecoded (bytes or paths): :mod:`smpo.data` decodes them
where a bad image can drop its pair."""

import glob
import json
import os


class PreferenceDataError(ValueError):
    """The preference data cannot be trained on as given; the message says what to fix."""


def load_preference_dataset(name_or_path, split="train", cache_dir=None):
    """Load a preference dataset as a ``datasets.Dataset``.

    ``name_or_path`` may be a hub dataset id, a ``save_to_disk`` folder (Dataset or DatasetDict),
    a folder (or file) of parquet files, or a folder of image files with a ``metadata.jsonl``
    whose lines hold ``caption``, ``image_0``, ``image_1`` (paths relative to the folder) and
    ``label_0``; its images are read when a pair is used.
    """
    return _undecoded_images(_load(name_or_path, split, cache_dir))


def _undecoded_images(dataset):
    """Keep image columns as bytes: decoding happens in open_image, where a bad image drops its pair."""
    import datasets

    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
    return dataset


def _load(name_or_path, split, cache_dir):
    import datasets

    if os.path.isdir(name_or_path):
        if os.path.exists(os.path.join(name_or_path, "metadata.jsonl")):
            return _load_image_folder(name_or_path)
        if any(os.path.exists(os.path.join(name_or_path, f)) for f in ("state.json", "dataset_dict.json")):
            loaded = datasets.load_from_disk(name_or_path)
            return _pick_split(loaded, split, name_or_path)
        parquet = sorted(glob.glob(os.path.join(name_or_path, "**", "*.parquet"), recursive=True))
        if parquet:
            return datasets.load_dataset("parquet", data_files=parquet, split="train", cache_dir=cache_dir)
        raise PreferenceDataError(
            f"{name_or_path} is a folder but holds no metadata.jsonl, no save_to_disk dataset "
            "(state.json / dataset_dict.json) and no parquet files."
        )
    if os.path.isfile(name_or_path) and name_or_path.endswith(".parquet"):
        return datasets.load_dataset("parquet", data_files=[name_or_path], split="train", cache_dir=cache_dir)
    return datasets.load_dataset(name_or_path, split=split, cache_dir=cache_dir)


def _pick_split(loaded, split, where):
    if isinstance(loaded, dict):  # DatasetDict
        if split not in loaded:
            raise PreferenceDataError(
                f"{where} has splits {sorted(loaded)}, not '{split}': set --dataset_split_name."
            )
        return loaded[split]
    return loaded


def _load_image_folder(folder):
    import datasets

    folder = os.path.abspath(folder)
    path = os.path.join(folder, "metadata.jsonl")
    rows, first_keys = [], None
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PreferenceDataError(f"{path}, line {line_no}: not valid JSON ({e}).") from None
            missing = [k for k in ("caption", "image_0", "image_1") if k not in row]
            if missing:
                raise PreferenceDataError(f"{path}, line {line_no}: missing keys {missing} (found {sorted(row)}).")
            if rows and set(row) != first_keys:
                raise PreferenceDataError(
                    f"{path}, line {line_no}: keys {sorted(row)} differ from the first line's "
                    f"{sorted(first_keys)}; every line needs the same keys.")
            first_keys = first_keys or set(row)
            row["jpg_0"] = os.path.join(folder, row.pop("image_0"))
            row["jpg_1"] = os.path.join(folder, row.pop("image_1"))
            rows.append(row)
    if not rows:
        raise PreferenceDataError(f"{path} holds no pairs.")
    return datasets.Dataset.from_list(rows)
