"""Pseudo-labelling (train.pseudo_label): confident test images, labelled by each fold's own first-round model,
train a second round whose OOF stays leak-free; infer then predicts with that round."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, make_config

from pipeline import folds, infer, layout, prepare, train
from pipeline.data.images import Cache
from pipeline.errors import DataError
from pipeline.training.checkpoints import load_fold_model
from pipeline.training.kfold import TrainingData, fold_indices
from pipeline.training.models import Heads
from pipeline.training.pseudo import head_targets, select_confident, with_pseudo_rows


def test_select_confident_takes_rows_whose_top_probability_reaches_the_threshold():
    proba = np.array([[0.95, 0.05], [0.6, 0.4], [0.1, 0.9], [0.5, 0.5]])
    rows, classes = select_confident(proba, 0.9)
    assert rows.tolist() == [0, 2] and classes.tolist() == [0, 1]  # 0.9 itself counts
    rows, classes = select_confident(proba, 0.5)
    assert rows.tolist() == [0, 1, 2, 3] and classes.tolist() == [0, 0, 1, 0]  # a tie takes the first class


def test_head_targets_decompose_a_class_into_its_heads():
    single = Heads(["a", "b", "c"], [("target", ["a", "b", "c"])])
    assert head_targets(single, np.array([2, 0])).tolist() == [[2], [0]]
    # class 0 = (0, 0), class 1 = (0, 1), class 2 = (1, 0)
    two = Heads(["x", "y", "z"], [("h1", ["0", "1"]), ("h2", ["0", "1"])], compose_index=[[0, 0], [0, 1], [1, 0]])
    assert head_targets(two, np.array([2, 0, 1])).tolist() == [[1, 0], [0, 0], [0, 1]]


def test_pseudo_rows_are_trained_on_by_every_fold_and_validated_by_none():
    heads = Heads(["a", "b"], [("target", ["a", "b"])])
    data = TrainingData(images=np.zeros((3, 2, 2, 1), np.uint8), ids=np.array(["t0", "t1", "t2"]),
                        folds=np.array([0, 1, 1]), targets=np.array([[0], [1], [0]]), labels=np.array([0, 1, 0]),
                        heads=heads, mean=[0.5], std=[0.2])
    extended = with_pseudo_rows(data, np.full((2, 2, 2, 1), 7, np.uint8), np.array(["x0", "x1"]), np.array([1, 0]))
    assert extended.ids.tolist() == ["t0", "t1", "t2", "x0", "x1"]
    assert extended.targets.tolist() == [[0], [1], [0], [1], [0]] and extended.labels.tolist() == [0, 1, 0, 1, 0]
    assert extended.images[3:].max() == 7 and extended.images[:3].max() == 0
    cfg = make_config(ROOT / "unused")
    for fold, (train_rows, validation_rows) in {0: ([1, 2, 3, 4], [0]), 1: ([0, 3, 4], [1, 2])}.items():
        train_indices, validation_indices = fold_indices(cfg, extended, fold, None)
        assert train_indices.tolist() == train_rows and validation_indices.tolist() == validation_rows


def fold_test_proba(cfg, fold):
    """What fold ``fold``'s first-round best.pt predicts for the test images, computed here independently."""
    cache = Cache.open(cfg)
    model, _ = load_fold_model(layout.fold_dir(cfg, "lcnet_050", fold) / "best.pt", cache.class_names,
                               torch.device("cpu"))
    with torch.no_grad():
        return model.eval()(torch.from_numpy(np.array(cache.images("test"))).permute(0, 3, 1, 2)).double().numpy()


@pytest.mark.slow
def test_round_two_trains_on_each_folds_own_pseudo_labels_and_infer_uses_it(tmp_path, capfd):
    def config(*overrides):
        return make_config(tmp_path / "work", "backbones=[lcnet_050]", "train.epochs=2", "infer.tta=[]", *overrides)

    plain = config()
    prepare.main(plain)
    folds.main(plain)
    round1 = train.main(plain)["lcnet_050"]
    infer.main(plain)
    plain_test = pd.read_parquet(layout.preds_file(plain, "lcnet_050")).drop(columns="id").to_numpy()
    done_before = {f: (layout.fold_dir(plain, "lcnet_050", f) / "done.json").read_text() for f in (0, 1)}

    threshold = 0.3  # the smoke models are barely trained: their top class is below 0.9
    cfg = config("train.pseudo_label=true", f"train.pseudo_threshold={threshold}")
    capfd.readouterr()
    report = train.main(cfg)["lcnet_050"]
    err = capfd.readouterr().err
    assert err.count("already trained") == 2 and "round 1 (without pseudo-labels)" in err  # round one is reused
    assert {f: (layout.fold_dir(cfg, "lcnet_050", f) / "done.json").read_text() for f in (0, 1)} == done_before
    assert report["round1_cv"] == pytest.approx(round1["cv"])
    test_ids = Cache.open(cfg).table("test")["id"].astype(str).tolist()
    for fold in (0, 1):  # leak-free: fold k's labels are fold k's own first-round model's, which never saw fold k
        labels = pd.read_csv(layout.pseudo_fold_dir(cfg, "lcnet_050", fold) / layout.FOLD_PSEUDO_LABELS)
        proba = fold_test_proba(cfg, fold)
        expected = np.flatnonzero(proba.max(1) >= threshold)
        assert labels["id"].tolist() == [test_ids[i] for i in expected] and len(expected) > 0
        np.testing.assert_allclose(labels["probability"], proba[expected].max(1), atol=1e-5)
        assert labels["label"].tolist() == [f"p{c}" for c in np.array(["000", "033", "067", "100"])[
            proba[expected].argmax(1)]]
        assert (layout.pseudo_fold_dir(cfg, "lcnet_050", fold) / "best.pt").exists()
    oof = pd.read_parquet(layout.oof_file(cfg, "lcnet_050"))
    assert sorted(oof["id"]) == sorted(Cache.open(cfg).table("train")["id"].astype(str))  # no test id, each once
    metrics = json.loads(layout.train_metrics_file(cfg, "lcnet_050").read_text())
    assert metrics["lcnet_050_round1_cv"] == pytest.approx(round1["cv"]) and "lcnet_050_cv" in metrics

    infer.main(cfg)
    assert "round two's models" in capfd.readouterr().err
    pseudo_test = pd.read_parquet(layout.preds_file(cfg, "lcnet_050")).drop(columns="id").to_numpy()
    assert not np.allclose(pseudo_test, plain_test)
    infer.main(plain)  # the option off: round one's models again, unchanged
    np.testing.assert_allclose(pd.read_parquet(layout.preds_file(plain, "lcnet_050")).drop(columns="id"),
                               plain_test, atol=1e-9)
    with pytest.raises(DataError, match="other settings"):  # round two made at another threshold is refused
        infer.main(config("train.pseudo_label=true", "train.pseudo_threshold=0.5"))


def test_pseudo_labels_with_auxiliary_heads_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", "configs/smoke.yaml",
                             f"paths.work_dir={tmp_path}", "train.pseudo_label=true", "data.aux_cols=[type]"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train.pseudo_label" in result.stderr and "data.aux_cols" in result.stderr
