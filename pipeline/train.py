"""Stage train: k-fold training of each timm backbone, with out-of-fold probabilities.

Reads:  the image cache, folds.csv, and the backbone's tuned ``best_params.yaml`` when
        ``train.use_tuned`` and it exists.
Writes: per backbone, ``models/<backbone>/fold<k>/`` (best.pt and last.pt: weights, the resolved
        config, the heads and class names, enough to rebuild the model alone), ``oof/<backbone>.parquet``
        (id, fold, one probability column per class; every training id exactly once),
        ``metrics/<backbone>.json`` (per fold and mean/std), the folds' per-epoch curves (one TSV per metric,
        the folds overlaid by ``dvc plots show``), a confusion-matrix PNG (rows normalised per true class,
        counts in the cells), and every epoch's metrics to the loggers of ``train.loggers`` (DVCLive,
        TensorBoard, wandb: ``pipeline.training.loggers``). Every path is named in ``pipeline.layout``.

The folds themselves are ``pipeline.training.kfold``'s: a finished fold is skipped, a killed one resumes.
"""

from __future__ import annotations

import shutil
import sys
from functools import partial

import numpy as np
import pandas as pd

from pipeline import cli, layout, metrics
from pipeline.artifacts import atomic_dir, probability_table, save_figure, write_json, write_parquet
from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.training import distributed
from pipeline.training.devices import resolve_devices
from pipeline.training.fold_setup import check_choices
from pipeline.training.kfold import cross_validate, load_training_data, tuned_config
from pipeline.training.loggers import FOLD_FOLDERS, check_loggers, open_fold_loggers
from pipeline.training.pseudo import check_pseudo, pseudo_round
from pipeline.training.refit import refit_epochs, train_refit


def confusion_figure(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str], title: str):
    """The confusion matrix normalised per true class (each row sums to 1, so a rare class's recall shows as
    plainly as a common one's), with each cell's share and count written in it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

    counts = confusion_matrix(y_true, y_pred, labels=range(len(class_names)))
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.6 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    display = ConfusionMatrixDisplay(shares, display_labels=class_names)
    display.plot(ax=axis, cmap="Blues", colorbar=True, im_kw={"vmin": 0.0, "vmax": 1.0},
                 xticks_rotation=45 if len(class_names) > 6 else 0)
    for (row, column), text in np.ndenumerate(display.text_):
        text.set_text(f"{shares[row, column]:.2f}\n({counts[row, column]})")
        text.set_fontsize(8 if len(class_names) > 6 else 10)
    axis.set_title(f"{title}\nrows: true class, share of its images (count)", fontsize=10)
    return figure


def write_fold_curves(cfg: Config, backbone: str, results) -> None:
    """The folds' per-epoch history as one TSV per metric (epoch, fold, value), which ``dvc plots show`` draws
    with the folds overlaid; the folder is swapped in whole, so a metric no longer logged leaves no file."""
    history = pd.DataFrame([{"fold": result.fold, **record} for result in results for record in result.history])
    with atomic_dir(layout.fold_curves_dir(cfg, backbone)) as folder:
        for name in [c for c in history.columns if c not in ("epoch", "fold", "seconds")]:
            curve = history[["epoch", "fold", name]].dropna()  # the value last: DVC's y when none is named
            curve.astype({"epoch": int, "fold": int}).to_csv(folder / f"{name}.tsv", sep="\t", index=False)


def remove_stale_folds(cfg: Config, backbone: str, current: list[int]) -> None:
    """Delete the fold folders (models and fold logs) of folds the current folds.csv does not have: they were
    trained on another split and infer must never average them in."""
    parents = [layout.model_dir(cfg, backbone), layout.pseudo_dir(cfg, backbone),
               *(layout.fold_logs_dir(cfg, name, backbone) for name in FOLD_FOLDERS)]
    for folder in [path for parent in parents for path in parent.glob("fold*")]:
        if folder.name[4:].isdigit() and int(folder.name[4:]) not in current:
            shutil.rmtree(folder)
            print(f"[{backbone}] removed {folder}: fold {folder.name[4:]} is not a fold of {layout.folds_file(cfg)}",
                  file=sys.stderr)


def fold_mean_std(results) -> tuple[float, float]:
    """The CV figure of a set of folds: the mean and sample standard deviation of their kept scores."""
    scores = np.array([result.best_score for result in results])
    return float(scores.mean()), float(scores.std(ddof=1)) if len(scores) > 1 else 0.0


def train_backbone(cfg: Config, backbone: str) -> dict:
    cfg = tuned_config(cfg, backbone)
    data = load_training_data(cfg)
    all_folds = sorted(np.unique(data.folds).tolist())
    folds = cfg.train.folds if cfg.train.folds is not None else all_folds
    bad = [f for f in folds if f not in all_folds]
    if bad:
        raise ConfigError(f"train.folds {bad} are not folds of {layout.folds_file(cfg)} (it has {all_folds})")
    if distributed.is_main():  # under torchrun rank 0 writes (and removes) for all
        remove_stale_folds(cfg, backbone, all_folds)
    distributed.barrier()
    print(f"[{backbone}] training {len(folds)} fold(s), {cfg.train.epochs} epochs, "
          f"{len(data.ids)} images, classes {data.heads.class_names}", file=sys.stderr)
    results = cross_validate(cfg, backbone, data, layout.model_dir(cfg, backbone), folds,
                             open_loggers=partial(open_fold_loggers, cfg, backbone),
                             devices=resolve_devices(cfg.train.devices, cfg.runtime.device))
    round1 = None
    if cfg.train.pseudo_label:  # round two: OOF, CV and infer use it
        round1, results = results, pseudo_round(cfg, backbone, data, results)
    if cfg.train.refit:  # every rank trains it under torchrun
        refit_epochs_chosen = refit_epochs(results)
        train_refit(cfg, backbone, data, refit_epochs_chosen)
    if not distributed.is_main():
        return {}
    write_fold_curves(cfg, backbone, results)
    proba = np.zeros((len(data.ids), len(data.heads.class_names)))
    covered = np.zeros(len(data.ids), dtype=bool)
    for result in results:
        proba[result.validation_indices] = result.validation_proba
        covered[result.validation_indices] = True
    ids, fold_column, proba, y_true = data.ids[covered], data.folds[covered], proba[covered], data.labels[covered]
    write_parquet(layout.oof_file(cfg, backbone),
                  probability_table(ids, proba, data.heads.class_names, fold_column))
    per_fold = [{"fold": r.fold, cfg.metric: r.best_score, "best_epoch": r.best_epoch + 1,
                 **metrics.summary(data.labels[r.validation_indices], r.validation_proba, data.heads.class_names)}
                for r in results]
    cv, cv_std = fold_mean_std(results)
    report = {"backbone": backbone, "metric": cfg.metric, "cv": cv, "cv_std": cv_std,
              "oof": metrics.summary(y_true, proba, data.heads.class_names) | {
                  cfg.metric: metrics.score(cfg.metric, y_true, proba)},
              "folds": per_fold}
    if cfg.train.refit:
        report["refit_epochs"] = refit_epochs_chosen
    if round1 is not None:
        report["round1_cv"], report["round1_cv_std"] = fold_mean_std(round1)
        print(f"[{backbone}] round 1 (without pseudo-labels) CV {cfg.metric} {report['round1_cv']:.4f} ± "
              f"{report['round1_cv_std']:.4f}", file=sys.stderr)
    write_json(layout.train_metrics_file(cfg, backbone), metrics.train_record(report))
    save_figure(layout.confusion_file(cfg, backbone),
                confusion_figure(y_true, proba.argmax(1), data.heads.class_names,
                                 f"{backbone} OOF ({cfg.metric} {report['cv']:.3f})"))
    print(f"[{backbone}]{' round 2 (with pseudo-labels)' if round1 else ''} CV {cfg.metric} {report['cv']:.4f} ± "
          f"{report['cv_std']:.4f}; "
          f"OOF accuracy {report['oof']['accuracy']:.4f}, log loss {report['oof']['log_loss']:.4f}", file=sys.stderr)
    return report


def main(cfg: Config, backbone: str | None = None) -> dict:
    """Train ``backbone`` (the CLI's ``--backbone``), or every backbone of the config."""
    check_choices(cfg)
    distributed.start()  # under torchrun: one model across the processes (DistributedDataParallel)
    names = [backbone] if backbone else list(cfg.backbones)
    for name in names:  # a logger set per backbone needs its package too
        check_loggers(cfg.for_backbone(name))
        check_pseudo(cfg.for_backbone(name))
    return {name: train_backbone(cfg, name) for name in names}


if __name__ == "__main__":
    cli.run(main, "k-fold training of timm backbones.", backbone_option=True)
