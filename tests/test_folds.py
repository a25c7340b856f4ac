"""Fold assignment: stratified, disjoint and covering, group-aware, seeded."""

import numpy as np
import pandas as pd
import pytest
from conftest import make_config

from pipeline import folds
from pipeline.errors import DataError
from pipeline.folds import assign_folds, split_problems


def labels_table(seed=0):
    rng = np.random.default_rng(seed)
    return rng.choice(["a", "b", "c", "d"], size=503, p=[0.55, 0.25, 0.15, 0.05])


@pytest.mark.parametrize("n_splits", [2, 5])
def test_stratified_folds_keep_class_shares(n_splits):
    labels = labels_table()
    folds = assign_folds(labels, n_splits, seed=1)
    assert set(folds) == set(range(n_splits))  # covering, every row in exactly one fold
    for label in np.unique(labels):
        per_fold = np.bincount(folds[labels == label], minlength=n_splits)
        ideal = (labels == label).sum() / n_splits
        assert np.all(np.abs(per_fold - ideal) <= 1), (label, per_fold, ideal)


def test_groups_never_split_and_classes_stay_balanced():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(120), 7)  # 7 photos per person, like the mask competition
    labels = np.repeat(rng.choice(["x", "y", "z"], size=120), 7)
    folds = assign_folds(labels, 5, seed=3, groups=groups)
    for group in np.unique(groups):
        assert len(set(folds[groups == group])) == 1
    for label in np.unique(labels):
        shares = np.bincount(folds[labels == label], minlength=5) / (labels == label).sum()
        assert np.all(np.abs(shares - 0.2) < 0.1)


def test_same_seed_same_folds_other_seed_other_folds():
    labels = labels_table()
    assert np.array_equal(assign_folds(labels, 5, 7), assign_folds(labels, 5, 7))
    assert not np.array_equal(assign_folds(labels, 5, 7), assign_folds(labels, 5, 8))


def test_too_few_members_for_the_folds():
    with pytest.raises(DataError, match="fewer images than folds"):
        assign_folds(["a"] * 10 + ["b"] * 2, 3, 0)


def test_split_problems_by_hand():
    labels = ["a", "a", "b", "b"]
    assert split_problems(labels, [0, 1, 0, 1], groups=["g1", "g2", "g3", "g4"]) == []
    assert split_problems(labels, [0, 1, 0, 1], groups=["g1", "g1", "g3", "g4"]) == ["group 'g1' is in folds [0, 1]"]
    assert split_problems(labels, [0, 0, 1, 1]) == ["class 'a' has no image in fold 1",
                                                    "class 'b' has no image in fold 0"]


def test_the_folds_stage_refuses_an_unsound_split(tmp_path, monkeypatch):
    cache = tmp_path / "work" / "cache"
    cache.mkdir(parents=True)
    pd.DataFrame({"id": [f"i{n}" for n in range(8)], "target": list("aaaabbbb"),
                  "group": ["g0", "g0", "g1", "g1", "g2", "g2", "g3", "g3"]}).to_parquet(cache / "train.parquet")
    cfg = make_config(tmp_path / "work", "folds.n_splits=2")
    # A splitter that puts one group in two folds: the stage must stop, naming it, and write nothing.
    monkeypatch.setattr(folds, "assign_folds", lambda *args: np.array([0, 1, 0, 0, 1, 1, 1, 0]))
    with pytest.raises(DataError, match="group 'g0' is in folds"):
        folds.main(cfg)
    assert not cfg.path("folds").exists()
