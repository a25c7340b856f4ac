"""Competition reading (ELPV build, Kaggle CSV, subfolders, mask layout), the cache, and bad inputs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, make_config, make_csv_competition, make_mask_competition, write_image
from PIL import Image

from pipeline import prepare
from pipeline.data.competition import build_elpv, read_competition
from pipeline.data.images import Cache, load_image
from pipeline.errors import DataError
from pipeline.training.models import Heads


def folder_config(tmp_path, comp, *overrides):
    return make_config(tmp_path / "work", "data.source=folder", f"data.dir={comp}", "data.image_size=16", *overrides)


def test_elpv_build_is_a_clean_split(tmp_path):
    cfg = make_config(tmp_path / "work")
    folder = build_elpv(cfg)
    train = pd.read_csv(folder / "train.csv")
    sample = pd.read_csv(folder / "sample_submission.csv")
    solution = pd.read_csv(folder / "solution.csv")
    assert not set(train["id"]) & set(sample["id"])  # no test id in train.csv
    assert sorted(solution["id"]) == sorted(sample["id"])  # solution ids = test ids
    assert len(train) + len(sample) == cfg.data.elpv_size  # class counts add up
    assert set(train["defect"]) == set(solution["defect"]) == {"p000", "p033", "p067", "p100"}
    assert set(solution["Usage"]) == {"Public", "Private"}
    assert "defect" not in sample.columns[2:] and list(sample.columns) == ["id", "defect"]
    assert {"type"} <= set(train.columns)  # the cell type is there as an auxiliary target
    shares = train["defect"].value_counts(normalize=True)
    test_shares = solution["defect"].value_counts(normalize=True)
    assert (shares - test_shares).abs().max() < 0.05  # stratified
    assert build_elpv(cfg) == folder  # reused, not rebuilt


def test_cache_pixels_equal_a_direct_pil_resize(tmp_path):
    comp = make_csv_competition(tmp_path / "comp")
    cfg = folder_config(tmp_path, comp, "data.image_size=[12, 20]")
    stats = prepare.main(cfg)
    cache = Cache.open(cfg)
    images, table = cache.images("train"), cache.table("train")
    assert images.shape == (len(table), 12, 20, 1) and images.dtype == np.uint8
    for row in (0, 7):
        with Image.open(table["path"][row]) as image:
            expected = np.asarray(image.convert("L").resize((20, 12), Image.BILINEAR))
        assert np.array_equal(images[row][:, :, 0], expected)
    assert stats["train_images"] == 40 and stats["test_images"] == 12
    assert cache.mean[0] == pytest.approx(images[:].mean() / 255, rel=1e-6)


def test_prepare_again_does_no_work(tmp_path):
    comp = make_csv_competition(tmp_path / "comp")
    cfg = folder_config(tmp_path, comp)
    prepare.main(cfg)
    stamp = (cfg.path("cache") / "train.npy").stat().st_mtime_ns
    prepare.main(cfg)
    assert (cfg.path("cache") / "train.npy").stat().st_mtime_ns == stamp


def test_the_cache_follows_the_images_bytes_not_their_file_times(tmp_path, capsys):
    """A teammate's clone pulls the cache and copies the images anew (new file times): the cache is still up to
    date, and the note of sizes and times beside it (not in it: DVC shares the cache) makes the next look quick."""
    comp = make_csv_competition(tmp_path / "comp")
    cfg = folder_config(tmp_path, comp)
    cache, note = cfg.path("cache"), cfg.path("cache").parent / ".cache.stamp.json"
    prepare.main(cfg)
    built = {p.name: p.read_bytes() for p in cache.iterdir()}
    images = sorted((comp / "train").iterdir())
    for image in images:
        os.utime(image, ns=(1, 1))  # as if copied anew
    capsys.readouterr()
    prepare.main(cfg)
    assert "is up to date" in capsys.readouterr().err and {p.name: p.read_bytes() for p in cache.iterdir()} == built
    assert json.loads(note.read_text())["fingerprint"] == json.loads(built["meta.json"])["fingerprint"]
    moved = shutil.copytree(comp, tmp_path / "another" / "home" / "comp")  # the same images where a teammate keeps them
    prepare.main(folder_config(tmp_path, moved))
    assert "is up to date" in capsys.readouterr().err and {p.name: p.read_bytes() for p in cache.iterdir()} == built
    with Image.open(images[0]) as image:
        Image.fromarray(255 - np.asarray(image)).save(images[0])  # other pixels, same id
    prepare.main(cfg)
    assert "cached" in capsys.readouterr().err and (cache / "meta.json").read_bytes() != built["meta.json"]


@pytest.mark.parametrize("id_with_extension", [False, True])
def test_kaggle_csv_with_and_without_extensions(tmp_path, id_with_extension):
    comp = make_csv_competition(tmp_path / "comp", extension=".jpg", id_with_extension=id_with_extension)
    competition = read_competition(folder_config(tmp_path, comp))
    assert competition.class_names == ["class_0", "class_1", "class_2"]
    assert competition.id_col == "id" and competition.target_col == "label"
    assert all(Path(p).is_file() for p in competition.train["path"])
    assert competition.test["id"].tolist() == pd.read_csv(comp / "sample_submission.csv")["id"].tolist()


def test_integer_labels_keep_numeric_order(tmp_path):
    comp = make_csv_competition(tmp_path / "comp", n_classes=3)
    train = pd.read_csv(comp / "train.csv")
    train["label"] = train["label"].map({"class_0": 10, "class_1": 2, "class_2": 1})
    train.to_csv(comp / "train.csv", index=False)
    assert read_competition(folder_config(tmp_path, comp)).class_names == ["1", "2", "10"]


def test_subfolder_layout(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        for index in range(3):
            image = rng.integers(0, 255, (8, 8), np.uint8)
            write_image(tmp_path / "comp" / "train" / label / f"{label}{index}.png", image)
    for index in range(2):
        write_image(tmp_path / "comp" / "test" / f"t{index}.png", rng.integers(0, 255, (8, 8), np.uint8))
    competition = read_competition(folder_config(tmp_path, tmp_path / "comp", "data.layout=subfolders"))
    assert competition.class_names == ["cat", "dog"]
    assert sorted(competition.train["target"]) == ["cat"] * 3 + ["dog"] * 3
    assert competition.test["id"].tolist() == ["t0", "t1"]


def test_mask_layout_composes_18_classes(tmp_path):
    comp = make_mask_competition(tmp_path / "comp", people=6)
    cfg = folder_config(tmp_path, comp, "data.layout=mask", "data.channels=3")
    competition = read_competition(cfg)
    train = competition.train
    assert len(train) == 6 * 7 and competition.class_names == [str(i) for i in range(18)]
    assert train["group"].nunique() == 6
    person = train[train["group"] == "000003_female_Asian_20"].set_index("id")
    assert person.loc["000003_female_Asian_20/mask2", "target"] == "3"  # wear, female, <30
    assert person.loc["000003_female_Asian_20/incorrect_mask", "target"] == "9"  # incorrect: 6 + 3 + 0
    assert person.loc["000003_female_Asian_20/normal", "target"] == "15"  # not wear: 12 + 3 + 0
    assert competition.test["id"].tolist()[0] == "eval000.jpg"
    # The heads compose back to every one of the 18 classes, each from a distinct combination.
    heads = Heads.from_meta({"class_names": competition.class_names, "heads": competition.heads,
                             "compose": competition.compose, "aux": {}}, [])
    combos = {tuple(c) for c in heads.compose_index}
    assert len(combos) == 18
    for cls, (mask, gender, age) in enumerate(heads.compose_index):
        assert mask * 6 + gender * 3 + age == cls


def test_mixed_image_modes_just_work(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (10, 14), dtype=np.uint8)
    cases = {
        "gray.png": Image.fromarray(pixels),
        "rgba.png": Image.fromarray(np.dstack([pixels] * 3 + [np.full_like(pixels, 255)]), "RGBA"),
        "palette.png": Image.fromarray(pixels).convert("P"),
        "sixteen.png": Image.fromarray(pixels.astype(np.uint16) * 257),
    }
    for name, image in cases.items():
        image.save(tmp_path / name)
        for channels in (1, 3):
            array = load_image(tmp_path / name, (8, 8), channels)
            assert array.shape == (8, 8, channels) and array.dtype == np.uint8
    sixteen = load_image(tmp_path / "sixteen.png", (10, 14), 1)[:, :, 0].astype(int)
    assert np.abs(sixteen - pixels.astype(int)).max() <= 1  # 16-bit scaled, not clipped to white


# ---------------------------------------------------------------- bad inputs: a clear message, no cache

def corrupt(comp):
    (comp / "train" / "tr0003.png").write_bytes(b"not an image at all")


def empty(comp):
    (comp / "train" / "tr0004.png").write_bytes(b"")


def truncated(comp):
    path = comp / "train" / "tr0005.png"
    path.write_bytes(path.read_bytes()[:60])


def missing_image(comp):
    (comp / "train" / "tr0006.png").unlink()


def missing_column(comp):
    pd.read_csv(comp / "train.csv").rename(columns={"label": "class"}).to_csv(comp / "train.csv", index=False)


def duplicate_id(comp):
    train = pd.read_csv(comp / "train.csv")
    train.loc[5, "id"] = train.loc[4, "id"]
    train.to_csv(comp / "train.csv", index=False)


def sample_without_image(comp):
    (comp / "test" / "te0002.png").unlink()


def nan_label(comp):
    train = pd.read_csv(comp / "train.csv")
    train.loc[3, "label"] = None
    train.to_csv(comp / "train.csv", index=False)


def empty_test_folder(comp):
    shutil.rmtree(comp / "test")
    (comp / "test").mkdir()


def shared_ids(comp):
    shutil.copy(comp / "train" / "tr0001.png", comp / "test" / "tr0001.png")
    sample = pd.read_csv(comp / "sample_submission.csv")
    sample.loc[0, "id"] = "tr0001"
    sample.to_csv(comp / "sample_submission.csv", index=False)


@pytest.mark.parametrize(("damage", "named"), [
    (corrupt, "tr0003.png"),
    (empty, "tr0004.png"),
    (truncated, "tr0005.png"),
    (missing_image, "tr0006"),
    (missing_column, "label"),
    (duplicate_id, "tr0004"),
    (sample_without_image, "te0002"),
    (nan_label, "line(s) [5]"),
    (empty_test_folder, "holds no images"),
    (shared_ids, "tr0001"),
])
def test_bad_competition_fails_clearly_and_writes_no_cache(tmp_path, damage, named):
    comp = make_csv_competition(tmp_path / "comp")
    damage(comp)
    work = tmp_path / "work"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.prepare", "--config", str(ROOT / "configs" / "smoke.yaml"),
         f"paths.work_dir={work}", "data.source=folder", f"data.dir={comp}", "data.image_size=16", "data.workers=1"],
        capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert named in result.stderr and "Traceback" not in result.stderr
    assert not (work / "cache").exists()


def test_every_bad_image_is_reported_at_once(tmp_path):
    comp = make_csv_competition(tmp_path / "comp")
    corrupt(comp)
    empty(comp)
    truncated(comp)
    with pytest.raises(DataError) as error:
        prepare.main(folder_config(tmp_path, comp, "data.workers=1"))
    message = str(error.value)
    assert "3 image(s)" in message
    assert all(name in message for name in ("tr0003.png", "tr0004.png", "tr0005.png"))
