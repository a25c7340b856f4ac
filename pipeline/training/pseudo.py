"""Pseudo-labelling (``train.pseudo_label``): a second round of training that adds confident test images.

Round one is the ordinary k-fold training. For fold k, round two trains again on fold k's training rows plus the
test images that fold k's own first-round model labels with a top-class probability of at least
``train.pseudo_threshold`` (hard labels, listed in the fold folder's ``pseudo_labels.csv``), and validates on
fold k's rows as before. Fold k's first-round model never trained on fold k's validation images, so nothing they
hold reaches round two's fold k through its labels: the second round's OOF and CV are as honest as the first's,
and train reports both (``cv`` and ``round1_cv``). ``trained_folds`` names the models that predict: round two's
or round one's.

The labels come from one plain forward pass of the fold's best.pt over the test images (no TTA). Round two is kept
in ``models/<backbone>/pseudo/fold<k>`` under a key made from round one's (``pseudo_key``): a re-run skips it, a
killed fold resumes, and turning the option off goes back to round one's models without training them again.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import layout, provenance
from pipeline.artifacts import write_csv
from pipeline.config import Config
from pipeline.data.images import Cache
from pipeline.errors import ConfigError, DataError
from pipeline.training import distributed, fold_setup
from pipeline.training.checkpoints import load_fold_model
from pipeline.training.kfold import FoldResult, TrainingData, load_training_data, settings_key, train_fold, tuned_config
from pipeline.training.loop import autocast_dtype, predict_logits, torch_device
from pipeline.training.models import Heads

PSEUDO_FOLD = -1  # the fold number of pseudo-labelled rows: trained on by every fold, validated by none


def select_confident(proba: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, class indices) of the rows whose top-class probability is at least ``threshold``."""
    rows = np.flatnonzero(proba.max(axis=1) >= threshold)
    return rows, proba[rows].argmax(axis=1)


def head_targets(heads: Heads, classes: np.ndarray) -> np.ndarray:
    """Each head's class index for submitted classes ``classes``: N x heads (the class itself with one head)."""
    if heads.compose_index is None:
        return np.asarray(classes).reshape(-1, 1)
    return np.asarray(heads.compose_index, dtype=np.int64)[classes]


def with_pseudo_rows(data: TrainingData, images: np.ndarray, ids: np.ndarray, classes: np.ndarray) -> TrainingData:
    """``data`` and, after its rows, test images labelled ``classes`` in fold ``PSEUDO_FOLD``."""
    return replace(data, images=np.concatenate([np.asarray(data.images), images]),
                   ids=np.concatenate([data.ids, ids]),
                   folds=np.concatenate([data.folds, np.full(len(ids), PSEUDO_FOLD, dtype=data.folds.dtype)]),
                   targets=np.concatenate([data.targets, head_targets(data.heads, classes).astype(data.targets.dtype)]),
                   labels=np.concatenate([data.labels, np.asarray(classes, dtype=data.labels.dtype)]))


def pseudo_key(round1_key: str, threshold: float) -> str:
    """Round two's settings key of a fold: round one's (the settings, images, folds and code of the model that made
    the labels), the threshold, and this module's code."""
    code = provenance.training_code_digest("training.pseudo")
    digest = hashlib.sha256(f"{threshold!r}\0{code}".encode()).hexdigest()[:8]
    return f"{round1_key}-pseudo-{digest}"


def check_pseudo(cfg: Config) -> None:
    if cfg.train.pseudo_label and cfg.data.aux_cols:
        raise ConfigError(f"train.pseudo_label cannot be used with data.aux_cols {cfg.data.aux_cols}: the test images "
                          f"have no labels for the auxiliary heads; set one of them off")


def test_probabilities(cfg: Config, checkpoint, cache: Cache) -> np.ndarray:
    """A fold model's class probabilities of every test image (one plain pass)."""
    device = torch_device(cfg.runtime.device)
    model, _ = load_fold_model(checkpoint, cache.class_names, device)
    loader = fold_setup.make_eval_loader(cfg, cache.images("test"), np.arange(len(cache.table("test"))), device,
                                       cfg.runtime.eval_batch_size)
    proba = predict_logits(model, loader, device, amp=autocast_dtype(cfg.runtime.amp, device), desc="pseudo-labels")
    return proba.numpy().astype(np.float64)


def pseudo_round(cfg: Config, backbone: str, data: TrainingData, round1: list[FoldResult]) -> list[FoldResult]:
    """Round two of each fold of ``round1``, in turn on ``runtime.device``; its FoldResults, in the same order
    (train's main has run ``check_pseudo``)."""
    cache = Cache.open(cfg)
    test_ids = cache.table("test")["id"].astype(str).to_numpy()
    test_images = np.asarray(cache.images("test"))
    threshold, class_names = cfg.train.pseudo_threshold, data.heads.class_names
    results = []
    for first in round1:
        fold = first.fold
        proba = test_probabilities(cfg, layout.fold_dir(cfg, backbone, fold) / layout.checkpoint_name("best"), cache)
        rows, classes = select_confident(proba, threshold)
        counts = np.bincount(classes, minlength=len(class_names))
        print(f"[{backbone}] fold {fold} round 2: {len(rows)} of {len(test_ids)} test images pseudo-labelled by "
              f"round 1's model (top probability >= {threshold}): "
              + ", ".join(f"{name} {count}" for name, count in zip(class_names, counts)), file=sys.stderr)
        folder = layout.pseudo_fold_dir(cfg, backbone, fold)
        if distributed.is_main():  # under torchrun every rank labels the same images; rank 0 writes
            taken = pd.DataFrame({"id": test_ids[rows], "probability": proba[rows].max(1),
                                  "label": np.asarray(class_names)[classes]})
            write_csv(folder / layout.FOLD_PSEUDO_LABELS, taken)
        fold_data = with_pseudo_rows(data, test_images[rows], test_ids[rows], classes)
        key = pseudo_key(settings_key(cfg, backbone, data, fold), threshold)
        results.append(train_fold(cfg, backbone, fold_data, fold, folder, key=key,
                                  label=f"[{backbone}] fold {fold} round 2"))
    return results


# ---------------------------------------------------------------- the models that predict (infer, the Kaggle package)

def trained_folds(cfg: Config, backbone: str) -> list[tuple[int, Path, str]]:
    """(fold, folder, the settings key its checkpoint must carry) of each trained fold of the current folds: round
    two's (``models/<backbone>/pseudo``) when ``train.pseudo_label``, else the folds' own.

    A fold folder that the current folds.csv does not have (``folds.n_splits`` lowered) is refused: its
    model was trained on other folds and must not be averaged into the test predictions.
    """
    tuned = tuned_config(cfg, backbone)
    data = load_training_data(tuned)
    current = set(np.unique(data.folds).tolist())
    round_two = tuned.train.pseudo_label
    model_dir = layout.pseudo_dir(cfg, backbone) if round_two else layout.model_dir(cfg, backbone)
    found = {int(p.name[4:]): p for p in model_dir.glob("fold*") if p.name[4:].isdigit()}
    stale = sorted(set(found) - current)
    if stale:
        raise DataError(f"{model_dir} holds fold(s) {stale} that {layout.folds_file(cfg)} does not have (were the "
                        f"folds changed?): re-run train for {backbone}, which removes them")
    if not found:
        raise DataError(f"no trained folds in {model_dir}: run train for {backbone} first")
    keys = {fold: settings_key(tuned, backbone, data, fold) for fold in found}
    if round_two:
        keys = {fold: pseudo_key(key, tuned.train.pseudo_threshold) for fold, key in keys.items()}
    return [(fold, folder, keys[fold]) for fold, folder in sorted(found.items())]
