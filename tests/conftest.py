"""Shared fixtures: a shrunk config writing to tmp_path, and small synthetic competitions."""

from __future__ import annotations

import os

# One torch thread per test process and per stage it starts (they inherit the environment): the suite runs in two
# pytest-xdist workers (pyproject's addopts), and two processes of two threads each on a 2-core machine spin in
# each other's way, ten times slower than one thread each. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.layout import overrides_under

ROOT = Path(__file__).resolve().parents[1]

# The longest test files, longest first (`pytest --durations=60`, summed per file: test_dvc.py about 500 s, the rest
# 100-300 s), which run before all others. Each file runs whole in one worker (--dist loadfile), and pytest-xdist
# would otherwise hand out the files with the most tests first, so that these few-test, minutes-long files came
# last and the longest ran alone at the end while the other worker sat idle.
LONGEST_FILES = ("test_dvc.py", "test_dvc_presets.py", "test_dvc_folder.py", "test_tune.py", "test_dvc_experiments.py",
                 "test_splits_benchmark.py", "test_devices.py", "test_faults.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=rank)  # stable: the other files, and the tests within each file, keep their order


def make_config(work_dir: Path, *overrides: str):
    """The smoke preset with every output in ``work_dir`` (the top-level submissions and metrics folders too, so
    no test writes into the repository) and any dotted overrides."""
    return load_config(ROOT / "configs" / "smoke.yaml", [*overrides_under(work_dir), *overrides])


def make_config_backbones_only(work_dir: Path, *overrides: str):
    """``make_config`` without the features and embed members, for tests that build every member's files by hand."""
    return make_config(work_dir, "features.enabled=false", "embed.enabled=false", *overrides)


@pytest.fixture
def smoke_config(tmp_path):
    return lambda *overrides: make_config(tmp_path / "work", *overrides)


def write_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def class_pattern(label: int, size: int, rng: np.random.Generator, channels: int = 1) -> np.ndarray:
    """An image whose class is visible: stripes whose period depends on the label, plus noise."""
    y, x = np.mgrid[0:size, 0:size]
    period = 3 + 2 * label
    base = 127 + 100 * np.sin(2 * np.pi * (x + y * (label % 2)) / period)
    image = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return np.stack([image] * 3, axis=-1) if channels == 3 else image


def make_csv_competition(root: Path, n_train: int = 40, n_test: int = 12, n_classes: int = 3, seed: int = 0,
                         extension: str = ".png", id_with_extension: bool = False, groups: bool = False) -> Path:
    """A tiny Kaggle-style folder: train.csv (id, label[, group]), train/, test/, sample_submission.csv,
    solution.csv."""
    rng = np.random.default_rng(seed)
    labels = [f"class_{i % n_classes}" for i in range(n_train)]
    rows = []
    for index, label in enumerate(labels):
        image_id = f"tr{index:04d}"
        write_image(root / "train" / f"{image_id}{extension}", class_pattern(int(label[-1]), 24, rng))
        row = {"id": image_id + (extension if id_with_extension else ""), "label": label}
        if groups:
            row["group"] = f"g{index // 4}"
        rows.append(row)
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    test_ids, test_labels = [], []
    for index in range(n_test):
        image_id = f"te{index:04d}"
        label = index % n_classes
        write_image(root / "test" / f"{image_id}{extension}", class_pattern(label, 24, rng))
        test_ids.append(image_id + (extension if id_with_extension else ""))
        test_labels.append(f"class_{label}")
    pd.DataFrame({"id": test_ids, "label": "class_0"}).to_csv(root / "sample_submission.csv", index=False)
    usage = ["Public" if i % 2 == 0 else "Private" for i in range(n_test)]
    pd.DataFrame({"id": test_ids, "label": test_labels, "Usage": usage}).to_csv(root / "solution.csv", index=False)
    return root


def make_mask_competition(root: Path, people: int = 6, seed: int = 0) -> Path:
    """The Boostcamp mask layout: train/train.csv + train/images/<person>/{mask1-5,incorrect_mask,normal}, eval/."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(people):
        gender = "male" if index % 2 == 0 else "female"
        age = [20, 45, 60][index % 3]
        folder = f"{index:06d}_{gender}_Asian_{age}"
        rows.append({"id": f"{index:06d}", "gender": gender, "race": "Asian", "age": age, "path": folder})
        for stem in ["mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal"]:
            write_image(root / "train" / "images" / folder / f"{stem}.jpg", class_pattern(index % 3, 24, rng, 3))
    pd.DataFrame(rows).to_csv(root / "train" / "train.csv", index=False)
    names = []
    for index in range(5):
        name = f"eval{index:03d}.jpg"
        write_image(root / "eval" / "images" / name, class_pattern(index % 3, 24, rng, 3))
        names.append(name)
    pd.DataFrame({"ImageID": names, "ans": 0}).to_csv(root / "eval" / "info.csv", index=False)
    return root


def check_member_tables(cfg, folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A member's OOF and test tables in ``folder`` hold every training id once, in folds.csv's fold, and every test id
    of the sample submission, each row a distribution; returns (oof, test)."""
    from pipeline import layout

    oof = pd.read_parquet(folder / layout.MEMBER_OOF)
    test = pd.read_parquet(folder / layout.MEMBER_TEST)
    folds_table = pd.read_csv(layout.folds_file(cfg), dtype=str)
    classes = [c for c in oof.columns if c not in ("id", "fold")]
    assert sorted(oof["id"]) == sorted(folds_table["id"]) and oof["id"].is_unique
    assert (oof.set_index("id")["fold"].astype(str) == folds_table.set_index("id")["fold"]).all()
    np.testing.assert_allclose(oof[classes].sum(1), 1.0)
    np.testing.assert_allclose(test[classes].sum(1), 1.0)
    sample = pd.read_csv(layout.cache_dir(cfg) / layout.CACHE_SAMPLE_SUBMISSION, dtype=str)
    assert sorted(test["id"]) == sorted(sample.iloc[:, 0])
    return oof, test
