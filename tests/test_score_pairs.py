"""score_pairs.py: reward scores for every pair, rows kept in order, unreadable pairs left out whole."""

import json
import os
import sys

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, run_script
from smpo.data import open_image

SCRIPT = os.path.join(ROOT, "score_pairs.py")
SCORES = ("reward_score_0", "reward_score_1")


@pytest.fixture(scope="module")
def clean(tiny_assets):
    return datasets.load_from_disk(str(tiny_assets / "tiny-pickapic"))


@pytest.fixture(scope="module")
def scored(scored_dataset):
    return datasets.load_from_disk(str(scored_dataset))


@pytest.fixture(scope="module")
def reward(tiny_assets):
    from transformers import AutoModel, AutoProcessor

    path = str(tiny_assets / "tiny-reward")
    return AutoModel.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def score_pairs(tiny_assets, dataset_path, output_dir, *extra, check=True):
    return run_script([sys.executable, SCRIPT, "--dataset_name", str(dataset_path),
                       "--reward_model_name_or_path", str(tiny_assets / "tiny-reward"),
                       "--output_dir", str(output_dir), "--batch_size", "4", "--device", "cpu", *extra], check=check)


def scores_of(dataset):
    return np.stack([np.asarray(dataset[c], dtype=np.float64) for c in SCORES], axis=1)


def test_scored_dataset_keeps_rows_and_columns(clean, scored, scored_dataset):
    assert len(scored) == len(clean)
    assert set(clean.column_names) <= set(scored.column_names)
    for c in SCORES:
        assert scored.features[c].dtype.startswith("float")
    scores = scores_of(scored)
    assert np.isfinite(scores).all()
    assert len(np.unique(scores.round(6))) > len(scored)  # distinct per row, so a shift would show
    assert scored["caption"] == clean["caption"]
    assert scored["jpg_0"] == clean["jpg_0"] and scored["jpg_1"] == clean["jpg_1"]
    assert scored["label_0"] == clean["label_0"]
    info = json.loads((scored_dataset / "bad_rows.json").read_text())
    assert info == {"bad_rows": [], "num_rows_in": len(clean), "num_rows_out": len(clean)}


def test_reward_scores_is_cosine_similarity_without_logit_scale(clean, scored, reward):
    from smpo.rewards import reward_scores

    model, processor = reward
    rows = [0, 3, 6]
    images = [open_image(clean[r]["jpg_1"]) for r in rows]
    captions = [clean[r]["caption"] for r in rows]
    scores = reward_scores(model, processor, images, captions, "cpu")
    assert scores.shape == (len(rows),)

    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        text = processor(text=captions, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_embeds = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text_embeds = model.text_projection(model.text_model(**text).pooler_output)
        by_hand = (F.normalize(image_embeds, dim=-1) * F.normalize(text_embeds, dim=-1)).sum(-1)
        logits = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                       pixel_values=pixels).logits_per_image.diagonal()
    torch.testing.assert_close(scores, by_hand, rtol=0, atol=1e-5)
    assert (scores.abs() <= 1).all()
    scale = model.logit_scale.exp().item()
    assert scale > 2
    torch.testing.assert_close(scores * scale, logits, rtol=0, atol=1e-4)  # the scale is left out
    assert not torch.allclose(scores, logits)
    # and the script wrote exactly these numbers for these rows
    np.testing.assert_allclose(np.asarray(scored["reward_score_1"])[rows], scores.numpy(), rtol=0, atol=1e-5)


def test_unreadable_images_leave_the_pair_out(tiny_assets, clean, scored, tmp_path):
    rows = clean.to_list()
    rows[1]["jpg_1"] = b"this is not an image at all"
    rows[5]["jpg_0"] = rows[5]["jpg_0"][: len(rows[5]["jpg_0"]) // 2]  # truncated JPEG
    broken_path = tmp_path / "broken"
    datasets.Dataset.from_list(rows, features=clean.features).save_to_disk(str(broken_path))
    assert datasets.load_from_disk(str(broken_path))[1]["jpg_1"] == b"this is not an image at all"

    out = tmp_path / "scored"
    proc = score_pairs(tiny_assets, broken_path, out, "--max_bad_pair_fraction", "0.2")
    log = proc.stdout + proc.stderr
    assert "row 1: unreadable image in jpg_1" in log and "row 5: unreadable image in jpg_0" in log and "[1, 5]" in log

    info = json.loads((out / "bad_rows.json").read_text())
    assert info == {"bad_rows": [1, 5], "num_rows_in": len(clean), "num_rows_out": len(clean) - 2}
    result = datasets.load_from_disk(str(out))
    kept = [r for r in range(len(clean)) if r not in (1, 5)]
    assert len(result) == len(kept)
    assert result["caption"] == [clean[r]["caption"] for r in kept]
    assert result["jpg_0"] == [clean[r]["jpg_0"] for r in kept]
    assert "_unreadable" not in result.column_names
    # same numbers as the clean run for the same rows: nothing shifted within a batch
    np.testing.assert_allclose(scores_of(result), scores_of(scored)[kept], rtol=0, atol=1e-6)


def test_too_many_unreadable_pairs_or_none_readable_fail_with_the_training_limit(tiny_assets, clean, tmp_path):
    rows = clean.to_list()
    rows[1]["jpg_1"] = b"this is not an image at all"
    broken = tmp_path / "broken"
    datasets.Dataset.from_list(rows, features=clean.features).save_to_disk(str(broken))
    proc = score_pairs(tiny_assets, broken, tmp_path / "a", check=False)  # 1 of 16: over the default 1%, as in training
    assert proc.returncode != 0 and not (tmp_path / "a").exists()
    assert f"1 of 16 pairs of {broken} have an unreadable image (rows [1] among them), more than " \
           "--max_bad_pair_fraction 0.01 allows" in proc.stderr

    nothing = tmp_path / "nothing"
    datasets.Dataset.from_list([{**r, "jpg_0": b""} for r in rows], features=clean.features).save_to_disk(str(nothing))
    proc = score_pairs(tiny_assets, nothing, tmp_path / "b", "--max_bad_pair_fraction", "1", check=False)
    assert proc.returncode != 0 and not (tmp_path / "b").exists()
    assert f"no readable pair in {nothing} (16 rows)" in proc.stderr


def test_metadata_jsonl_image_folder(tiny_assets, clean, scored, tmp_path):
    folder = tmp_path / "pairs"
    (folder / "images").mkdir(parents=True)
    lines = []
    for r in range(3):
        for k in (0, 1):
            (folder / "images" / f"{r}_{k}.jpg").write_bytes(clean[r][f"jpg_{k}"])
        lines.append({"caption": clean[r]["caption"], "image_0": f"images/{r}_0.jpg",
                      "image_1": f"images/{r}_1.jpg", "label_0": clean[r]["label_0"]})
    lines.append({"caption": "a missing file", "image_0": "images/0_0.jpg", "image_1": "images/nope.jpg",
                  "label_0": 1.0})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    out = tmp_path / "scored"
    proc = score_pairs(tiny_assets, folder, out, "--max_bad_pair_fraction", "0.25")
    assert "[3]" in proc.stdout + proc.stderr
    assert json.loads((out / "bad_rows.json").read_text())["bad_rows"] == [3]
    result = datasets.load_from_disk(str(out))
    assert result["caption"] == clean["caption"][:3]
    assert result["label_0"] == clean["label_0"][:3]
    np.testing.assert_allclose(scores_of(result), scores_of(scored)[:3], rtol=0, atol=1e-6)


def test_max_samples_and_defaults(tiny_assets, scored, tmp_path):
    import score_pairs as script

    args = script.parse_args(["--dataset_name", "x", "--output_dir", "y"])
    assert args.reward_model_name_or_path == "yuvalkirstain/PickScore_v1"
    assert args.reward_processor_name_or_path == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    assert args.dataset_split_name == "train" and args.caption_column == "caption" and args.batch_size == 16

    out = tmp_path / "subset"
    script.main(script.parse_args([
        "--dataset_name", str(tiny_assets / "tiny-pickapic"), "--reward_model_name_or_path",
        str(tiny_assets / "tiny-reward"), "--output_dir", str(out), "--max_samples", "5", "--batch_size", "2",
        "--device", "cpu"]))
    result = datasets.load_from_disk(str(out))
    assert len(result) == 5
    assert result.features["reward_score_0"].dtype == "float32"
    np.testing.assert_allclose(scores_of(result), scores_of(scored)[:5], rtol=0, atol=1e-6)
