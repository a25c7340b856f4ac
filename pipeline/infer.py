"""Stage infer: test probabilities of each backbone with test-time augmentation, averaged over folds.

Reads:  ``paths.models``/<backbone>/fold<k>/best.pt (or last.pt), ``paths.cache``, ``paths.folds``.
Writes: ``paths.preds``/<backbone>.parquet (id, one probability column per class, in the
        sample submission's order), <backbone>_oof.parquet (id, fold, classes: each fold's
        validation images predicted with the same TTA, so what the ensemble learns on OOF
        transfers to test), <backbone>_tta.csv (the OOF score of every TTA view alone and
        of the merge: which views help).

Each view is one batched forward pass (ttach's transforms on the device), so k views
cost k plain passes. Views are merged as probabilities (softmax first), by arithmetic or
geometric mean, so no merge can turn negative logits into NaN.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import cli, layout, metrics
from pipeline.artifacts import probability_table, write_csv, write_parquet
from pipeline.config import Config
from pipeline.data.competition import encode_labels
from pipeline.data.images import Cache
from pipeline.data.stage_tables import read_folds
from pipeline.errors import DataError
from pipeline.training.checkpoints import load_fold_model
from pipeline.training.devices import resolve_devices, run_on_devices
from pipeline.training.kfold import load_training_data, tuned_config
from pipeline.training.loop import autocast_dtype, torch_device
from pipeline.training.pseudo import trained_folds
from pipeline.training.refit import check_refit
from pipeline.training.tta import merge_views, predict_views, view_names
from pipeline.training.views import tta_transforms


def inference_device(cfg: Config, name: str | None = None):
    """(device, autocast dtype, channels_last) that models predict with: on ``name`` (a device worker's own), else
    on ``runtime.device``."""
    device = torch_device(name or cfg.runtime.device)
    return device, autocast_dtype(cfg.runtime.amp, device), cfg.runtime.channels_last and device.type == "cuda"


def predict_refit(cfg: Config, backbone: str, cache: Cache, compose) -> np.ndarray:
    """The full-data model's TTA'd test probabilities (``train.refit``), checked against the current settings."""
    device, amp, channels_last = inference_device(cfg)
    tuned = tuned_config(cfg, backbone)
    path = layout.refit_dir(cfg, backbone) / layout.checkpoint_name("best")
    if not path.exists():
        raise DataError(f"train.refit is on but {path} does not exist: re-run train for {backbone}")
    model, checkpoint = load_fold_model(path, cache.class_names, device)
    if not check_refit(checkpoint, tuned, backbone, load_training_data(tuned)):
        raise DataError(f"checkpoint {path} was trained with other settings, images, folds or training code than "
                        f"the current ones: re-run train for {backbone} (dvc repro does)")
    print(f"[{backbone}] refit model ({checkpoint['epoch'] + 1} epochs on every training image) on the test "
          f"images, blended with weight {cfg.infer.refit_weight}", file=sys.stderr)
    views = predict_views(model, cache.images("test"), np.arange(len(cache.table("test"))), compose, device,
                          cfg.runtime.eval_batch_size, amp, channels_last, f"[{backbone}] test refit")
    return merge_views(views, cfg.infer.merge)


def predict_fold(device: str | None, cfg: Config, backbone: str, fold: int, path: Path, expected_key: str,
                 validation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A fold model's TTA views of its validation images and of the test images, on ``device`` (None:
    ``runtime.device``; a device worker's own when ``train.devices`` names several)."""
    device, amp, channels_last = inference_device(cfg, device)
    cache = Cache.open(cfg)
    compose = tta_transforms(cfg.infer.tta, cfg.data.size_hw)
    model, checkpoint = load_fold_model(path, cache.class_names, device)
    if checkpoint.get("key") != expected_key:
        raise DataError(f"checkpoint {path} was trained with other settings, images, folds or training code than "
                        f"the current ones: re-run train for {backbone} (dvc repro does)")
    test = np.arange(len(cache.table("test")))
    print(f"[{backbone}] fold {fold}: {len(view_names(compose, cfg.infer.tta))} TTA view(s) on {len(validation)} "
          f"validation and {len(test)} test images", file=sys.stderr)
    batch_size = cfg.runtime.eval_batch_size
    return (predict_views(model, cache.images("train"), validation, compose, device, batch_size, amp, channels_last,
                          f"[{backbone}] oof {fold}"),
            predict_views(model, cache.images("test"), test, compose, device, batch_size, amp, channels_last,
                          f"[{backbone}] test {fold}"))


def infer_backbone(cfg: Config, backbone: str) -> dict:
    cfg = cfg.for_backbone(backbone)
    cache = Cache.open(cfg)
    compose = tta_transforms(cfg.infer.tta, cfg.data.size_hw)
    names = view_names(compose, cfg.infer.tta)
    train_table, test_table = cache.table("train"), cache.table("test")
    folds = read_folds(cfg)
    fold_of = dict(zip(folds["id"].astype(str), folds["fold"].astype(int)))
    train_ids = train_table["id"].astype(str).to_numpy()
    fold_column = np.array([fold_of.get(i, -1) for i in train_ids])
    labels = encode_labels(train_table["target"], cache.class_names, "the cache")
    fold_dirs = trained_folds(cfg, backbone)
    if cfg.train.pseudo_label:
        print(f"[{backbone}] predicting with round two's models (train.pseudo_label)", file=sys.stderr)
    test_sum = np.zeros((len(names), len(test_table), len(cache.class_names)))
    oof_views = np.full((len(names), len(train_ids), len(cache.class_names)), np.nan)
    jobs = [(cfg, backbone, fold, fold_dir / layout.checkpoint_name(cfg.infer.checkpoint), expected_key,
             np.flatnonzero(fold_column == fold)) for fold, fold_dir, expected_key in fold_dirs]
    devices = resolve_devices(cfg.train.devices, cfg.runtime.device)
    for (*_, validation), (fold_oof, fold_test) in zip(jobs, run_on_devices(predict_fold, jobs, devices,
                                                                            f"[{backbone}] inference")):
        oof_views[:, validation] = fold_oof
        test_sum += fold_test
    covered = ~np.isnan(oof_views[0, :, 0])
    test_proba = merge_views(test_sum / len(fold_dirs), cfg.infer.merge)
    if cfg.train.refit:
        refit = predict_refit(cfg, backbone, cache, compose)
        test_proba = (1 - cfg.infer.refit_weight) * test_proba + cfg.infer.refit_weight * refit
    oof_proba = merge_views(oof_views[:, covered], cfg.infer.merge)
    y_true = labels[covered]
    metric = cfg.metric
    view_table = pd.DataFrame({
        "view": names + [f"merged ({cfg.infer.merge})"],
        metric: [metrics.score(metric, y_true, v / v.sum(1, keepdims=True)) for v in oof_views[:, covered]]
        + [metrics.score(metric, y_true, oof_proba)],
        "log_loss": [metrics.score("log_loss", y_true, v) for v in oof_views[:, covered]]
        + [metrics.score("log_loss", y_true, oof_proba)]})
    write_parquet(layout.preds_file(cfg, backbone),
                  probability_table(test_table["id"].astype(str), test_proba, cache.class_names))
    write_parquet(layout.preds_oof_file(cfg, backbone),
                  probability_table(train_ids[covered], oof_proba, cache.class_names, fold_column[covered]))
    write_csv(layout.tta_file(cfg, backbone), view_table)
    print(f"[{backbone}] TTA views on OOF ({metric}):\n{view_table.to_string(index=False)}", file=sys.stderr)
    return {"backbone": backbone, "views": len(names), "oof_" + metric: float(view_table[metric].iloc[-1]),
            "plain_" + metric: float(view_table[metric].iloc[0])}


def main(cfg: Config, backbone: str | None = None) -> dict:
    tta_transforms(cfg.infer.tta, cfg.data.size_hw)  # a typo fails before any model is loaded
    return {name: infer_backbone(cfg, name) for name in ([backbone] if backbone else cfg.backbones)}


if __name__ == "__main__":
    cli.run(main, "Test (and OOF) probabilities with test-time augmentation.", backbone_option=True)
