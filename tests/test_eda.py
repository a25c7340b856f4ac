"""Tests for pipeline.eda: the pure functions on hand-made arrays, the stage end to end on a tiny competition."""

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import make_config, make_csv_competition, write_image
from PIL import Image

from pipeline import eda, prepare
from pipeline.analysis import statistics


def smooth_image(seed: int, size: int = 64) -> np.ndarray:
    """A picture-like image: a random 8 x 8 pattern blown up to ``size`` plus a little noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(40, 216, size=(8, 8)).astype(float)
    image = np.kron(coarse, np.ones((size // 8, size // 8))) + rng.normal(0, 3, (size, size))
    return np.clip(image, 0, 255).astype(np.uint8)


def distance(a: int, b: int) -> int:
    return (int(a) ^ int(b)).bit_count()


# ---------------------------------------------------------------- difference hash

def test_difference_hash_of_identical_images_is_equal():
    image = smooth_image(0)
    hashes = statistics.difference_hash(np.stack([image, image.copy()]))
    assert hashes.dtype == np.uint64 and hashes[0] == hashes[1]


def test_difference_hash_survives_a_contrast_and_brightness_change():
    image = smooth_image(1)
    relit = np.clip(image * 0.6 + 50, 0, 255).astype(np.uint8)
    a, b = statistics.difference_hash(np.stack([image, relit]))
    assert distance(a, b) <= statistics.NEAR_THRESHOLD


def test_difference_hash_of_unrelated_images_is_far():
    rng = np.random.default_rng(2)
    noise = rng.integers(0, 256, size=(2, 64, 64), dtype=np.uint8)
    a, b, c = statistics.difference_hash(np.stack([noise[0], noise[1], smooth_image(3)]))
    # Unrelated hashes differ in about half of their 64 bits.
    assert min(distance(a, b), distance(a, c), distance(b, c)) > 16


def test_difference_hash_takes_colour_and_tiny_images():
    colour = np.stack([smooth_image(4)] * 3, axis=-1)[None]
    grey = smooth_image(4)[None, :, :, None].mean(-1)
    assert statistics.difference_hash(colour)[0] == statistics.difference_hash(grey)[0]
    tiny = np.arange(16, dtype=np.uint8).reshape(1, 4, 4) * 10  # brighter to the right on every row
    assert statistics.difference_hash(tiny).shape == (1,)


# ---------------------------------------------------------------- pairs and duplicates

def test_hamming_pairs_on_a_hand_built_set():
    # Distances: 0-1: 1, 0-2: 3, 0-4: 5, 1-2: 2, 1-4: 4, 2-4: 2, 3 (all ones) is >= 59 from all.
    hashes = np.array([0, 0b1, 0b111, 2**64 - 1, 0b11111], dtype=np.uint64)
    pairs, total = statistics.hamming_pairs(hashes, threshold=2)
    assert pairs.values.tolist() == [[0, 1, 1], [1, 2, 2], [2, 4, 2]]
    assert total == 3
    across, total = statistics.hamming_pairs(np.array([0, 7], dtype=np.uint64),
                                            np.array([1, 0b111 << 61], dtype=np.uint64),
                                            threshold=1)
    assert across.values.tolist() == [[0, 0, 1]] and total == 1


def test_hamming_pairs_match_brute_force_across_blocks_and_count_past_the_cap():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=3000, dtype=np.uint64) * np.uint64(2)  # 3000 rows: several blocks
    planted = [(10, 2500), (700, 1400), (2999, 5)]
    for a, b in planted:
        hashes[b] = hashes[a] ^ np.uint64(0b1001)  # 2 bits apart
    brute = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    expected = {(a, b) for a, b in zip(*np.nonzero(np.triu(brute <= 4, k=1)))}
    pairs, total = statistics.hamming_pairs(hashes, threshold=4)
    assert set(zip(pairs["a"], pairs["b"])) == expected
    assert {tuple(sorted(p)) for p in planted} <= expected and total == len(expected)
    capped, total = statistics.hamming_pairs(hashes, threshold=4, max_pairs=2)
    assert len(capped) == 2 and total == len(expected)


def test_exact_groups():
    groups = statistics.exact_groups(["a", "b", "a", "c", "b", "a"])
    assert [g.tolist() for g in groups] == [[0, 2, 5], [1, 4]]


def test_find_duplicates_on_a_hand_built_set():
    train = pd.DataFrame({
        "id": ["t0", "t1", "t2", "t3", "t4"],
        "target": ["x", "y", "x", "x", "y"],
        "digest": ["d0", "d1", "d0", "d3", "d4"],  # t0 and t2 identical
        "hash": np.array([0, 0xFFFF << 16, 0, 0b11, 0xFFFF << 48], dtype=np.uint64),  # t3 near t0; t1, t4 far
    })
    test = pd.DataFrame({
        "id": ["s0", "s1", "s2"],
        "digest": ["d1", "e1", "e2"],  # s0 is t1 (leak)
        "hash": np.array([0xFFFF << 16, (0xFFFF << 16) + 1, 0xFF << 32], dtype=np.uint64),  # s1 near t1, s2 far
    })
    found = statistics.find_duplicates(train, test, threshold=2)
    exact = found["exact_train"]
    assert exact[["id_a", "id_b", "label_a", "label_b"]].values.tolist() == [["t0", "t2", "x", "x"]]
    # t2 is a copy of t0, so the near pair t0-t3 is reported once, not once per copy.
    assert found["near_train"][["id_a", "id_b", "distance"]].values.tolist() == [["t0", "t3", 2]]
    assert found["exact_leak"][["id_a", "id_b"]].values.tolist() == [["t1", "s0"]]
    # s0 is already an exact leak; s1 is the only near one.
    assert found["near_leak"][["id_a", "id_b", "distance"]].values.tolist() == [["t1", "s1", 1]]
    summary = statistics.duplicate_summary(found, threshold=2)
    assert summary["exact_train"] | {"examples": None} == {"sets": 1, "images": 2, "redundant_images": 1,
                                                           "label_conflicts": 0, "examples": None}
    assert summary["exact_train"]["examples"] == [{"ids": ["t0", "t2"], "labels": ["x", "x"]}]
    assert summary["near_train"]["pairs"] == 1 and summary["near_train"]["label_disagreements"] == 0
    assert summary["exact_leak"]["test_images"] == 1 and summary["near_leak"]["test_images"] == 1


# ---------------------------------------------------------------- counts, sizes, intensities

def test_class_balance_keeps_class_order_and_absent_classes():
    table = statistics.class_balance(["b", "a", "b", "b"], ["a", "b", "c"])
    assert table["count"].tolist() == [1, 3, 0]
    assert table["share"].tolist() == [0.25, 0.75, 0.0]


def test_group_summary():
    train = pd.DataFrame({"id": list("abcde"), "target": ["x", "y", "x", "x", "x"], "group": ["g", "g", "h", "h", "k"]})
    summary = statistics.group_summary(statistics.group_table(train))
    assert summary["n_groups"] == 3
    assert summary["images_per_group"] == {"min": 1, "median": 2.0, "mean": 5 / 3, "max": 2}
    assert summary["groups_by_class_count"] == {1: 2, 2: 1}


def test_channel_stats_equal_a_direct_computation():
    images = np.random.default_rng(0).integers(0, 256, size=(5, 7, 9, 3), dtype=np.uint8)
    scan = statistics.scan_images(images, "test")
    mean, std = statistics.channel_stats(scan["histogram"])
    pixels = images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, pixels.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(std, pixels.std(axis=0), atol=1e-12)
    assert scan["sums"].tolist() == images.reshape(5, -1, 3).sum(axis=1).tolist()


def test_class_intensity_by_hand():
    # Two 1 x 2 grey images of class a (means 0 and 255), one of class b (mean 51).
    sums = np.array([[0], [510], [102]])
    table = statistics.class_intensity(sums, ["a", "a", "b"], ["a", "b"], pixels_per_image=2)
    assert table["images"].tolist() == [2, 1]
    np.testing.assert_allclose(table["mean"], [0.5, 0.2])
    np.testing.assert_allclose(table["image_mean_std"], [0.5, 0.0])


@pytest.mark.parametrize("a, b, expected", [
    ([1, 2, 3], [3, 2, 1], 0.0),
    ([1, 1], [2, 2], 1.0),
    ([1, 2], [2, 3], 0.5),  # CDFs at 1: 1/2 vs 0; at 2: 1 vs 1/2
    ([1, 2, 3, 4], [4], 0.75),
])
def test_ks_distance_by_hand(a, b, expected):
    assert statistics.ks_distance(a, b) == pytest.approx(expected)


def test_sizes_from_headers_summary_and_comparison(tmp_path):
    for name, (height, width) in {"a": (10, 20), "b": (10, 20), "c": (30, 30)}.items():
        write_image(tmp_path / f"{name}.png", np.zeros((height, width), dtype=np.uint8))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    sizes = statistics.read_sizes([tmp_path / f"{n}.png" for n in ("a", "b", "c", "broken")], "test")
    summary = statistics.size_summary(sizes)
    assert summary["unreadable"] == 1 and summary["distinct_sizes"] == 2
    assert summary["most_common"][0] == {"size": "20x10", "count": 2, "share": 2 / 3}
    assert summary["aspect"] == {"min": 1.0, "median": 2.0, "max": 2.0}
    assert not statistics.compare_sizes(sizes, sizes)["differ"]
    other = pd.DataFrame({"width": [500.0] * 3, "height": [400.0] * 3, "aspect": [1.25] * 3})
    assert statistics.compare_sizes(sizes, other)["differ"]


# ---------------------------------------------------------------- the stage

@pytest.mark.slow
def test_eda_stage_end_to_end(tmp_path):
    comp = make_csv_competition(tmp_path / "comp", n_train=24, n_test=8, n_classes=3, groups=True)
    train_csv = pd.read_csv(comp / "train.csv")
    train_csv["type"] = ["mono" if i % 2 else "poly" for i in range(len(train_csv))]
    # An exact duplicate with a conflicting label, and a test image that is a train image (a leak).
    shutil.copyfile(comp / "train" / "tr0000.png", comp / "train" / "dup0000.png")
    train_csv.loc[len(train_csv)] = {"id": "dup0000", "label": "class_1", "group": "gdup", "type": "mono"}
    train_csv.to_csv(comp / "train.csv", index=False)
    shutil.copyfile(comp / "train" / "tr0001.png", comp / "test" / "te0000.png")
    cfg = make_config(tmp_path / "work", "data.source=folder", f"data.dir={comp}", "data.image_size=16",
                      "data.workers=1", "data.group_col=group", "data.aux_cols=[type]")
    prepare.main(cfg)
    result = eda.main(cfg)

    folder = cfg.path("eda")
    summary = json.loads((folder / "eda.json").read_text())
    assert summary == json.loads(json.dumps(result, default=str))
    for name in ["class_balance.png", "sizes.png", "intensity.png", "samples.png", "groups.png",
                 "labels_type.png", "duplicates.png", "adversarial.png"]:
        assert (folder / "figures" / name).stat().st_size > 0, name  # a folder of their own: dvc plots show's
        assert Image.open(folder / "figures" / name).format == "PNG"
    assert summary["class_counts"] == train_csv["label"].value_counts().to_dict()
    assert summary["n_train"] == 25 and summary["n_test"] == 8 and summary["n_groups"] == 7
    assert summary["label_columns"]["type"]["class_1"] == {"mono": 5, "poly": 4}  # with dup0000 (mono)

    duplicates = summary["duplicates"]
    assert duplicates["exact_train"]["examples"] == [{"ids": ["tr0000", "dup0000"], "labels": ["class_0", "class_1"]}]
    assert duplicates["exact_train"]["label_conflicts"] == 1
    assert duplicates["exact_leak"]["test_images"] == 1
    assert duplicates["exact_leak"]["examples"] == [{"a": "tr0001", "b": "te0000", "distance": 0,
                                                     "pixel_difference": 0.0, "train_label": "class_1"}]

    meta = json.loads((cfg.path("cache") / "meta.json").read_text())
    np.testing.assert_allclose(summary["intensity"]["mean"], meta["mean"], atol=1e-6)
    np.testing.assert_allclose(summary["intensity"]["std"], meta["std"], atol=1e-6)
    assert summary["sizes"]["train"]["most_common"][0]["size"] == "24x24"
    assert not summary["sizes"]["comparison"]["differ"]

    report = (folder / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert sorted(links) == sorted(summary["plots"]) and all((folder / link).exists() for link in links)
    assert "dup0000" in report and "te0000" in report
    adversarial = summary["adversarial"]
    assert 0.0 <= adversarial["auc"] <= 1.0 and len(adversarial["fold_aucs"]) == 5
    assert adversarial["verdict"] in report and "Train vs test" in report
    assert len(adversarial["most_test_like"]) == 10
    assert {row["id"] for row in adversarial["most_test_like"]} <= set(train_csv["id"])
