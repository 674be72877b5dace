"""smpo.data: loading, column checks, pair selection, the pair transform and the winner-first collator."""

import io
import json
import random

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from smpo.cache import LatentCache
from smpo.data import (PairDataset, PairTransform, PreferenceCollator, PreferenceDataError, UnreadableImageError,
                       check_columns, load_preference_dataset, open_image, select_pairs)
from smpo.labels import DEFAULT_GAMMA, DEFAULT_TEMPERATURE, preference_weight

RES = 32
PICKAPIC_COLUMNS = ["caption", "jpg_0", "jpg_1", "label_0", "label_1", "image_0_uid", "model_0", "user_id"]
# (width, height) of the two images of each tiny-pickapic pair, row i uses SIZES[i % 4]
SIZES = [((48, 40), (40, 56)), ((64, 32), (36, 36)), ((33, 47), (50, 38)), ((40, 40), (72, 40))]


# ----------------------------------------------------------------------------------- helpers
def encode(image, fmt="PNG"):
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def random_image(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def left_dark_image(width, height):
    """Dark on the left half, bright on the right: a flip is visible."""
    array = np.full((height, width, 3), 255, dtype=np.uint8)
    array[:, : width // 2] = 0
    return Image.fromarray(array)


def to_pixels(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def fixed_transform():
    """No random crop, no flip: the same output for any rng, so expected images are easy to build."""
    return PairTransform(RES, random_crop=False, hflip=False)


def expected_pixels(value):
    return fixed_transform()([open_image(value)], random.Random(0))[0][0]


def with_scores(dataset, gaps, rows=None):
    """Add reward_score_0/1 columns with score_0 - score_1 = gaps[i] for the given rows (0 elsewhere)."""
    rows = list(range(len(gaps))) if rows is None else rows
    s0, s1 = [0.2] * len(dataset), [0.2] * len(dataset)
    for r, gap in zip(rows, gaps):
        s0[r], s1[r] = 0.2 + gap / 2, 0.2 - gap / 2
    return dataset.add_column("reward_score_0", s0).add_column("reward_score_1", s1)


@pytest.fixture(scope="module")
def pickapic_path(tiny_assets):
    return str(tiny_assets / "tiny-pickapic")


@pytest.fixture(scope="module")
def pickapic(pickapic_path):
    return datasets.load_from_disk(pickapic_path)


# ----------------------------------------------------------------------------------- loading
def test_loads_a_save_to_disk_dataset_with_pickapic_columns(pickapic_path, pickapic):
    ds = load_preference_dataset(pickapic_path)
    assert len(ds) == 16
    assert set(PICKAPIC_COLUMNS) <= set(ds.column_names)
    assert isinstance(ds[0]["jpg_0"], bytes)
    assert ds[2]["label_0"] == 0.5
    assert ds["caption"] == pickapic["caption"]
    assert open_image(ds[0]["jpg_0"]).size == SIZES[0][0]


def test_loads_the_requested_split_of_a_dataset_dict(pickapic, tmp_path):
    path = str(tmp_path / "dict")
    datasets.DatasetDict({"train": pickapic.select(range(4)), "test": pickapic.select([9, 10])}).save_to_disk(path)
    test = load_preference_dataset(path, split="test")
    assert test["caption"] == [pickapic[9]["caption"], pickapic[10]["caption"]]
    assert len(load_preference_dataset(path)) == 4  # "train" by default


def test_missing_split_error_names_the_available_splits(pickapic, tmp_path):
    path = str(tmp_path / "dict")
    datasets.DatasetDict({"train": pickapic.select(range(2)), "test": pickapic.select([3])}).save_to_disk(path)
    with pytest.raises(PreferenceDataError) as err:
        load_preference_dataset(path, split="validation")
    message = str(err.value)
    assert "validation" in message and "'test'" in message and "'train'" in message
    assert "--dataset_split_name" in message


def test_loads_a_folder_of_parquet_shards_in_order(pickapic, tmp_path):
    (tmp_path / "pq" / "data").mkdir(parents=True)
    pickapic.select(range(8)).to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00002.parquet"))
    pickapic.select(range(8, 16)).to_parquet(str(tmp_path / "pq" / "data" / "train-00001-of-00002.parquet"))
    ds = load_preference_dataset(str(tmp_path / "pq"), cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 16
    assert ds["caption"] == pickapic["caption"]
    assert ds["label_0"] == pickapic["label_0"]
    assert ds[5]["jpg_1"] == pickapic[5]["jpg_1"]


def test_loads_a_single_parquet_file(pickapic, tmp_path):
    path = str(tmp_path / "pairs.parquet")
    pickapic.select(range(3)).to_parquet(path)
    ds = load_preference_dataset(path, cache_dir=str(tmp_path / "cache"))
    assert ds["caption"] == pickapic["caption"][:3]


def test_image_features_are_kept_undecoded(tmp_path):
    features = datasets.Features({"caption": datasets.Value("string"), "jpg_0": datasets.Image(),
                                  "jpg_1": datasets.Image(), "label_0": datasets.Value("float64")})
    ds = datasets.Dataset.from_dict({"caption": ["x"], "jpg_0": [random_image(20, 10, 0)],
                                     "jpg_1": [random_image(10, 20, 1)], "label_0": [1.0]}, features=features)
    ds.save_to_disk(str(tmp_path / "img"))
    loaded = load_preference_dataset(str(tmp_path / "img"))
    assert isinstance(loaded[0]["jpg_0"], dict) and loaded[0]["jpg_0"]["bytes"]
    assert open_image(loaded[0]["jpg_1"]).size == (10, 20)


def write_image_folder(folder, lines):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n")


def test_loads_a_metadata_jsonl_image_folder_with_non_ascii_captions(tmp_path):
    folder = tmp_path / "folder"
    (folder / "images").mkdir(parents=True)
    random_image(30, 20, 0).save(folder / "images" / "a0.png")
    random_image(24, 36, 1).save(folder / "images" / "a1.jpg", quality=95)
    random_image(40, 40, 2).save(folder / "images" / "b0.jpeg")
    random_image(16, 48, 3).save(folder / "images" / "b1.png")
    caption = "Ein Bär im Schnee ☃, 東京の夜"
    write_image_folder(folder, [
        {"caption": caption, "image_0": "images/a0.png", "image_1": "images/a1.jpg", "label_0": 1.0},
        "",  # blank lines are skipped
        {"caption": "two", "image_0": "images/b0.jpeg", "image_1": "images/b1.png", "label_0": 0.0},
    ])
    ds = load_preference_dataset(str(folder))
    assert len(ds) == 2
    assert ds[0]["caption"] == caption
    assert ds["label_0"] == [1.0, 0.0]
    assert open_image(ds[0]["jpg_0"]).size == (30, 20)
    assert open_image(ds[1]["jpg_1"]).size == (16, 48)

    check_columns(ds.column_names, "caption", "dpo")
    rows, _ = select_pairs(ds, "dpo")
    batch = PreferenceCollator(fixed_transform(), "dpo")([PairDataset(ds, rows)[i] for i in range(2)])
    assert batch["captions"] == [caption, "two"]
    assert torch.equal(batch["pixel_values"][0], expected_pixels(str(folder / "images" / "a0.png")))
    assert torch.equal(batch["pixel_values"][1], expected_pixels(str(folder / "images" / "b1.png")))
    assert batch["original_sizes"].tolist() == [[20, 30], [48, 16], [36, 24], [40, 40]]


def test_metadata_jsonl_bad_json_line_error_names_the_line(tmp_path):
    folder = tmp_path / "bad"
    good = {"caption": "c", "image_0": "a.png", "image_1": "b.png", "label_0": 1.0}
    write_image_folder(folder, [good, good, '{"caption": "c", "image_0": "a.png",'])
    with pytest.raises(PreferenceDataError, match=r"line 3\b"):
        load_preference_dataset(str(folder))


def test_metadata_jsonl_inconsistent_keys_error_names_the_line(tmp_path):
    folder = tmp_path / "keys"
    good = {"caption": "c", "image_0": "a.png", "image_1": "b.png", "label_0": 1.0}
    write_image_folder(folder, [good, {"caption": "c", "image_0": "a.png", "image_1": "b.png"}])
    with pytest.raises(PreferenceDataError, match=r"line 2\b") as err:
        load_preference_dataset(str(folder))
    assert "label_0" in str(err.value)


def test_metadata_jsonl_missing_image_key_error_names_the_line(tmp_path):
    folder = tmp_path / "missing"
    write_image_folder(folder, [{"caption": "c", "image_0": "a.png", "image_1": "b.png"},
                                {"caption": "c", "image_0": "a.png", "image_one": "b.png"}])
    with pytest.raises(PreferenceDataError, match=r"line 2\b") as err:
        load_preference_dataset(str(folder))
    assert "image_1" in str(err.value)


def test_folder_without_any_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("nothing here")
    with pytest.raises(PreferenceDataError, match="metadata.jsonl"):
        load_preference_dataset(str(tmp_path / "empty"))


# ----------------------------------------------------------------------------- check_columns
def test_missing_caption_column_error_names_found_columns_and_the_flag():
    with pytest.raises(PreferenceDataError) as err:
        check_columns(["prompt", "jpg_0", "jpg_1", "label_0"], "caption", "dpo")
    message = str(err.value)
    assert "'caption'" in message and "--caption_column" in message
    for column in ("prompt", "jpg_0", "jpg_1", "label_0"):
        assert column in message


def test_smpo_without_reward_scores_points_to_score_pairs():
    with pytest.raises(PreferenceDataError) as err:
        check_columns(["caption", "jpg_0", "jpg_1", "label_0"], "caption", "smpo")
    assert "score_pairs.py" in str(err.value) and "reward_score_0" in str(err.value)
    check_columns(["caption", "jpg_0", "jpg_1", "reward_score_0", "reward_score_1"], "caption", "smpo")


@pytest.mark.parametrize("loss_type", ["dpo", "sft"])
def test_human_label_losses_need_label_0(loss_type):
    with pytest.raises(PreferenceDataError, match="label_0"):
        check_columns(["caption", "jpg_0", "jpg_1", "reward_score_0", "reward_score_1"], "caption", loss_type)
    check_columns(["caption", "jpg_0", "jpg_1", "label_0"], "caption", loss_type)


def test_missing_image_column_is_an_error():
    with pytest.raises(PreferenceDataError, match="jpg_1"):
        check_columns(["caption", "jpg_0", "label_0"], "caption", "dpo")


# ------------------------------------------------------------------------------ select_pairs
@pytest.mark.parametrize("loss_type", ["dpo", "sft"])
def test_human_label_losses_drop_the_tie_and_report_its_row(pickapic, loss_type):
    rows, dropped = select_pairs(pickapic, loss_type)
    assert rows == [r for r in range(16) if r != 2]
    # the rows left out, by reason
    assert [rows for rows in dropped.values() if rows] == [[2]]
    assert any("tie" in why for why, rows in dropped.items() if rows)


def test_smpo_drops_non_finite_scores_reports_their_rows_and_keeps_ties(pickapic):
    s0 = [0.2 + 0.01 * i for i in range(16)]
    s1 = [0.21] * 16
    s0[5], s1[7], s0[11] = float("nan"), float("inf"), float("-inf")
    ds = pickapic.add_column("reward_score_0", s0).add_column("reward_score_1", s1)
    rows, dropped = select_pairs(ds, "smpo")
    assert rows == [r for r in range(16) if r not in (5, 7, 11)]
    assert 2 in rows  # the human tie does not matter to smpo
    assert [rows for rows in dropped.values() if rows] == [[5, 7, 11]]


def test_invalid_label_error_names_the_row(pickapic):
    labels = list(pickapic["label_0"])
    labels[4] = 0.3
    ds = pickapic.remove_columns("label_0").add_column("label_0", labels)
    with pytest.raises(PreferenceDataError, match=r"\[4\]"):
        select_pairs(ds, "dpo")


def test_max_train_samples_is_a_seeded_subset_of_the_kept_rows(pickapic):
    rows_a, _ = select_pairs(pickapic, "dpo", max_train_samples=5, seed=0)
    rows_b, _ = select_pairs(pickapic, "dpo", max_train_samples=5, seed=0)
    rows_c, _ = select_pairs(pickapic, "dpo", max_train_samples=5, seed=1)
    assert rows_a == rows_b
    assert rows_a != rows_c
    for rows in (rows_a, rows_c):
        assert len(rows) == 5 and len(set(rows)) == 5
        assert 2 not in rows and all(0 <= r < 16 for r in rows)
    all_rows, _ = select_pairs(pickapic, "dpo", max_train_samples=100, seed=0)
    assert len(all_rows) == 15


def test_no_pair_left_is_an_error(pickapic):
    ds = pickapic.remove_columns("label_0").add_column("label_0", [0.5] * 16)
    with pytest.raises(PreferenceDataError, match="no pairs left"):
        select_pairs(ds, "dpo")


# ----------------------------------------------------------------------------- PairTransform
def test_images_of_different_sizes_become_square_tensors_in_range():
    images = [left_dark_image(48, 40), left_dark_image(40, 56)]  # black and white halves
    for transform in (PairTransform(RES), PairTransform(RES, random_crop=True), PairTransform(24, hflip=False)):
        out = transform(images, random.Random(0))
        assert len(out) == 2
        for (pixels, original_size, crop), image in zip(out, images):
            r = transform.resolution
            assert pixels.shape == (3, r, r) and pixels.dtype == torch.float32
            assert pixels.min() >= -1.0 and pixels.max() <= 1.0
            assert pixels.min() == -1.0 and pixels.max() == 1.0  # black -> -1, white -> +1
            assert original_size == (image.height, image.width)


def test_center_crop_coordinates_by_hand():
    wide, tall = random_image(48, 40, 0), random_image(40, 56, 1)
    (p_wide, size_wide, crop_wide), (p_tall, size_tall, crop_tall) = fixed_transform()([wide, tall], random.Random(0))
    # 48x40 -> shorter side 40 to 32: 38x32, crop left (38 - 32) // 2 = 3, top 0
    assert size_wide == (40, 48) and crop_wide == (0, 3)
    assert torch.equal(p_wide, to_pixels(wide.resize((38, 32), Image.BILINEAR).crop((3, 0, 35, 32))))
    # 40x56 -> shorter side 40 to 32: 32x45 (44.8 rounded), crop top (45 - 32) // 2 = 6, left 0
    assert size_tall == (56, 40) and crop_tall == (6, 0)
    assert torch.equal(p_tall, to_pixels(tall.resize((32, 45), Image.BILINEAR).crop((0, 6, 32, 38))))


def test_small_images_are_upscaled():
    pixels, size, crop = fixed_transform()([random_image(20, 10, 0)], random.Random(0))[0]
    assert pixels.shape == (3, RES, RES) and size == (10, 20) and crop == (0, 16)  # 64x32, left (64-32)//2


def test_random_crop_stays_within_bounds_and_matches_the_reported_crop():
    image = random_image(48, 40, 0)  # resized to 38x32: left in [0, 6], top 0
    tall = random_image(40, 56, 1)  # resized to 32x45: top in [0, 13], left 0
    transform = PairTransform(RES, random_crop=True, hflip=False)
    lefts, tops = set(), set()
    for seed in range(40):
        (p0, _, (top0, left0)), (p1, _, (top1, left1)) = transform([image, tall], random.Random(seed))
        assert top0 == 0 and 0 <= left0 <= 6
        assert left1 == 0 and 0 <= top1 <= 13
        assert torch.equal(p0, to_pixels(image.resize((38, 32), Image.BILINEAR).crop((left0, 0, left0 + RES, RES))))
        assert torch.equal(p1, to_pixels(tall.resize((32, 45), Image.BILINEAR).crop((0, top1, RES, top1 + RES))))
        lefts.add(left0)
        tops.add(top1)
    assert len(lefts) > 3 and len(tops) > 5  # the crop really is random


def is_flipped(pixels):
    return bool(pixels[:, :, 0].mean() > pixels[:, :, -1].mean())


def test_hflip_is_shared_by_both_images_of_a_pair():
    pair = [left_dark_image(48, 40), left_dark_image(40, 56)]
    transform = PairTransform(RES, random_crop=True, hflip=True)
    flips = []
    for seed in range(30):
        (p0, _, _), (p1, _, _) = transform(pair, random.Random(seed))
        assert is_flipped(p0) == is_flipped(p1), seed
        flips.append(is_flipped(p0))
    assert any(flips) and not all(flips)


def test_reported_crop_of_a_flipped_image_is_its_position_in_the_flipped_image():
    image = random_image(64, 40, 3)  # resized to 51x32
    resized = image.resize((51, 32), Image.BILINEAR)
    mirrored = resized.transpose(Image.FLIP_LEFT_RIGHT)
    transform = PairTransform(RES, random_crop=True, hflip=True)
    seen_flip = seen_plain = False
    for seed in range(30):
        pixels, _, (top, left) = transform([image], random.Random(seed))[0]
        assert top == 0 and 0 <= left <= 51 - RES
        if torch.equal(pixels, to_pixels(mirrored.crop((left, 0, left + RES, RES)))):
            seen_flip = True  # flipped: (top, left) is where the crop sits in the mirrored image
        else:
            assert torch.equal(pixels, to_pixels(resized.crop((left, 0, left + RES, RES))))
            seen_plain = True
    assert seen_flip and seen_plain


def test_hflip_disabled_never_flips():
    pair = [left_dark_image(48, 40), left_dark_image(40, 56)]
    transform = PairTransform(RES, random_crop=True, hflip=False)
    for seed in range(30):
        for pixels, _, _ in transform(pair, random.Random(seed)):
            assert not is_flipped(pixels)


def test_transform_is_deterministic_for_the_same_rng_seed():
    pair = [random_image(48, 40, 0), random_image(40, 56, 1)]
    transform = PairTransform(RES, random_crop=True, hflip=True)
    a = transform(pair, random.Random(123))
    b = transform(pair, random.Random(123))
    for (pa, sa, ca), (pb, sb, cb) in zip(a, b):
        assert torch.equal(pa, pb) and sa == sb and ca == cb
    others = [transform(pair, random.Random(seed)) for seed in range(10)]
    assert any(not torch.equal(o[0][0], a[0][0]) for o in others)


# ------------------------------------------------------------------------ PreferenceCollator
def examples_of(dataset, rows):
    pairs = PairDataset(dataset, rows)
    return [pairs[i] for i in range(len(rows))]


def test_dpo_puts_the_human_winner_first(pickapic):
    # tiny-pickapic: label_0 = 0 for even rows (image 1 wins), 1 for odd rows (image 0 wins)
    batch = PreferenceCollator(fixed_transform(), "dpo")(examples_of(pickapic, [0, 1]))
    px = batch["pixel_values"]
    assert px.shape == (4, 3, RES, RES)
    assert torch.equal(px[0], expected_pixels(pickapic[0]["jpg_1"]))  # row 0 winner: image 1
    assert torch.equal(px[1], expected_pixels(pickapic[1]["jpg_0"]))  # row 1 winner: image 0
    assert torch.equal(px[2], expected_pixels(pickapic[0]["jpg_0"]))  # losers follow, same order
    assert torch.equal(px[3], expected_pixels(pickapic[1]["jpg_1"]))
    # original (height, width) of winner 0, winner 1, loser 0, loser 1
    assert batch["original_sizes"].tolist() == [[56, 40], [32, 64], [40, 48], [36, 36]]
    assert batch["crop_top_lefts"].tolist() == [[6, 0], [0, 16], [0, 3], [0, 0]]
    assert torch.equal(batch["weight"], torch.ones(2))
    assert batch["rows"].tolist() == [0, 1] and batch["bad_rows"] == []
    assert batch["captions"] == [pickapic[0]["caption"], pickapic[1]["caption"]]


def test_dpo_ignores_reward_scores(pickapic):
    ds = with_scores(pickapic, [0.1, -0.1])  # scores disagree with the human labels of rows 0 and 1
    batch = PreferenceCollator(fixed_transform(), "dpo")(examples_of(ds, [0, 1]))
    assert torch.equal(batch["pixel_values"][0], expected_pixels(pickapic[0]["jpg_1"]))
    assert torch.equal(batch["weight"], torch.ones(2))


def test_smpo_winner_comes_from_the_scores_not_the_human_label(pickapic):
    ds = with_scores(pickapic, [0.05])  # row 0: human label says image 1, the scores say image 0
    batch = PreferenceCollator(fixed_transform(), "smpo", temperature=DEFAULT_TEMPERATURE,
                               gamma=DEFAULT_GAMMA)(examples_of(ds, [0]))
    assert torch.equal(batch["pixel_values"][0], expected_pixels(pickapic[0]["jpg_0"]))
    assert torch.equal(batch["pixel_values"][1], expected_pixels(pickapic[0]["jpg_1"]))
    _, weight = preference_weight(torch.tensor([ds[0]["reward_score_0"]]), torch.tensor([ds[0]["reward_score_1"]]))
    assert batch["weight"].dtype == torch.float32
    assert batch["weight"].tolist() == pytest.approx(weight.tolist(), abs=1e-6)
    assert batch["weight"].item() == pytest.approx(10 * np.tanh(0.05 / (2 * DEFAULT_TEMPERATURE)), abs=1e-4)


def test_smpo_batch_with_mixed_winners_orders_and_weights_every_pair(pickapic):
    rows = [0, 1, 3, 4, 5, 6]
    gaps = [-0.01, 0.03, -0.05, -0.002, 0.08, 0.12]  # score_0 - score_1; image 0 wins where > 0
    ds = with_scores(pickapic, gaps, rows)
    tau, gamma = 0.1, 7.0
    batch = PreferenceCollator(fixed_transform(), "smpo", temperature=tau, gamma=gamma)(examples_of(ds, rows))
    b = len(rows)
    assert batch["pixel_values"].shape == (2 * b, 3, RES, RES)
    assert batch["rows"].tolist() == rows
    assert batch["captions"] == [pickapic[r]["caption"] for r in rows]
    for i, (row, gap) in enumerate(zip(rows, gaps)):
        winner, loser = ("jpg_0", "jpg_1") if gap > 0 else ("jpg_1", "jpg_0")
        assert torch.equal(batch["pixel_values"][i], expected_pixels(pickapic[row][winner])), row
        assert torch.equal(batch["pixel_values"][b + i], expected_pixels(pickapic[row][loser])), row
        w_size, l_size = SIZES[row % 4][int(winner[-1])], SIZES[row % 4][int(loser[-1])]
        assert batch["original_sizes"][i].tolist() == [w_size[1], w_size[0]]
        assert batch["original_sizes"][b + i].tolist() == [l_size[1], l_size[0]]
        _, weight = preference_weight(torch.tensor([ds[row]["reward_score_0"]]),
                                      torch.tensor([ds[row]["reward_score_1"]]), tau, gamma)
        assert batch["weight"][i].item() == pytest.approx(weight.item(), abs=1e-6), row
        assert batch["weight"][i].item() == pytest.approx(gamma * np.tanh(abs(gap) / (2 * tau)), abs=1e-4), row


def test_a_pair_with_an_unreadable_image_is_dropped_whole_and_the_rest_stay_aligned(pickapic):
    rows = [0, 1, 3, 4, 5]
    gaps = [0.02, -0.04, 0.06, -0.08, 0.1]
    ds = with_scores(pickapic, gaps, rows)
    examples = examples_of(ds, rows)
    examples[1]["jpg_1"] = b"this is not an image"  # row 1: garbage
    examples[3]["jpg_0"] = examples[3]["jpg_0"][: len(examples[3]["jpg_0"]) // 2]  # row 4: truncated JPEG
    collator = PreferenceCollator(fixed_transform(), "smpo", temperature=DEFAULT_TEMPERATURE, gamma=DEFAULT_GAMMA)
    batch = collator(examples)
    kept = [0, 3, 5]
    assert batch["bad_rows"] == [1, 4]  # travels with the batch (DataLoader workers)
    assert batch["rows"].tolist() == kept
    assert batch["captions"] == [pickapic[r]["caption"] for r in kept]
    assert batch["pixel_values"].shape == (6, 3, RES, RES)
    assert batch["original_sizes"].shape == (6, 2) and batch["weight"].shape == (3,)
    for i, row in enumerate(kept):
        gap = gaps[rows.index(row)]
        winner, loser = ("jpg_0", "jpg_1") if gap > 0 else ("jpg_1", "jpg_0")
        assert torch.equal(batch["pixel_values"][i], expected_pixels(pickapic[row][winner])), row
        assert torch.equal(batch["pixel_values"][3 + i], expected_pixels(pickapic[row][loser])), row
        assert batch["weight"][i].item() == pytest.approx(
            10 * np.tanh(abs(gap) / (2 * DEFAULT_TEMPERATURE)), abs=1e-4), row
    # each batch names its own bad rows
    second = collator([{**examples[0], "row": 9, "jpg_0": b"\x00" * 10}, examples[2]])
    assert second["bad_rows"] == [9] and second["rows"].tolist() == [3]


def test_missing_image_file_drops_the_pair(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    random_image(40, 40, 0).save(folder / "a.png")
    random_image(40, 40, 1).save(folder / "b.png")
    write_image_folder(folder, [{"caption": "ok", "image_0": "a.png", "image_1": "b.png", "label_0": 1.0},
                                {"caption": "gone", "image_0": "a.png", "image_1": "missing.png", "label_0": 1.0}])
    ds = load_preference_dataset(str(folder))
    collator = PreferenceCollator(fixed_transform(), "dpo")
    batch = collator(examples_of(ds, [0, 1]))
    assert batch["captions"] == ["ok"] and batch["bad_rows"] == [1]


def test_a_batch_with_no_readable_pair_holds_only_its_bad_rows(pickapic):
    examples = examples_of(pickapic, [0, 1])
    examples[0]["jpg_0"] = b"garbage"
    examples[1]["jpg_1"] = b""
    collator = PreferenceCollator(fixed_transform(), "dpo")
    assert collator(examples) == {"bad_rows": [0, 1]}


def test_what_pil_cannot_decode_is_an_unreadable_image_naming_its_column(tmp_path):
    jpeg, png = encode(random_image(40, 40, 0), "JPEG"), encode(random_image(40, 40, 1))
    for value in (b"", b"garbage", jpeg[: len(jpeg) // 2], png[: len(png) // 2], png[:100] + b"x" * 50 + png[150:],
                  None, {"bytes": None, "path": None}, str(tmp_path / "missing.png")):
        with pytest.raises(UnreadableImageError, match="unreadable image in jpg_1"):
            open_image(value, "jpg_1")


def test_a_bug_while_reading_a_pair_surfaces_and_is_not_counted_as_an_unreadable_image(pickapic, tmp_path):
    def broken_transform(images, rng):
        raise ZeroDivisionError("a bug in the transform")

    with pytest.raises(ZeroDivisionError):
        PreferenceCollator(broken_transform, "dpo")(examples_of(pickapic, [0, 1]))
    # a latent cache that lacks a row asked for is a bug too, not an unreadable image
    save_file({"mean": torch.zeros(1, 2, 4, 2, 2), "std": torch.ones(1, 2, 4, 2, 2),
               "original_sizes": torch.full((1, 2, 2), 16), "crop_top_lefts": torch.zeros(1, 2, 2, dtype=torch.long),
               "rows": torch.tensor([0]), "bad_rows": torch.tensor([], dtype=torch.long)}, str(tmp_path / "c"))
    collator = PreferenceCollator(fixed_transform(), "dpo", latent_cache=LatentCache(str(tmp_path / "c")))
    assert collator(examples_of(pickapic, [0]))["rows"].tolist() == [0]
    with pytest.raises(KeyError):
        collator(examples_of(pickapic, [0, 1]))


def test_proportion_empty_prompts(pickapic):
    rows = [0, 1, 3, 4, 5, 6, 7, 8, 9, 10]
    examples = examples_of(pickapic, rows)
    all_empty = PreferenceCollator(fixed_transform(), "dpo", proportion_empty_prompts=1.0)(examples)
    assert all_empty["captions"] == [""] * len(rows)
    none_empty = PreferenceCollator(fixed_transform(), "dpo", proportion_empty_prompts=0.0)(examples)
    assert none_empty["captions"] == [pickapic[r]["caption"] for r in rows]
    half = PreferenceCollator(fixed_transform(), "dpo", proportion_empty_prompts=0.5, seed=3)(examples)
    assert 0 < half["captions"].count("") < len(rows)
    assert all(c in ("", pickapic[r]["caption"]) for c, r in zip(half["captions"], rows))


def test_same_seed_epoch_and_row_give_identical_pixels_whatever_the_batch(pickapic):
    transform = PairTransform(RES, random_crop=True, hflip=True)
    a = PreferenceCollator(transform, "dpo", seed=7)(examples_of(pickapic, [3, 5, 7]))
    b = PreferenceCollator(transform, "dpo", seed=7)(examples_of(pickapic, [7, 3]))
    assert torch.equal(a["pixel_values"][0], b["pixel_values"][1])  # row 3 winner
    assert torch.equal(a["pixel_values"][2], b["pixel_values"][0])  # row 7 winner
    assert torch.equal(a["pixel_values"][5], b["pixel_values"][2])  # row 7 loser
    assert torch.equal(a["crop_top_lefts"][[0, 2]], b["crop_top_lefts"][[1, 0]])

    rows = [r for r in range(16) if r != 2]
    base = PreferenceCollator(transform, "dpo", seed=7)(examples_of(pickapic, rows))
    other_epoch = PreferenceCollator(transform, "dpo", seed=7)
    other_epoch.epoch = 1
    other_seed = PreferenceCollator(transform, "dpo", seed=8)
    for collator in (other_epoch, other_seed):
        assert not torch.equal(collator(examples_of(pickapic, rows))["pixel_values"], base["pixel_values"])
