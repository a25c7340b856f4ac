"""Two reference baselines scored on the pipeline's own folds.

    python benchmarks/baselines.py [--config FILE] [key.sub=value ...]

Reads the image cache (``prepare``) and ``folds.csv`` (``folds``) exactly as the stages do and
scores, per fold and on the pooled out-of-fold predictions:

1. ``majority``: the most frequent class of each fold's training part, predicted for everything;
2. ``logreg``: scikit-learn logistic regression on the cached images block-averaged to 16 x 16
   pixels and standardised (fit on the training part only), both plain and with
   ``class_weight="balanced"``; the variant with the better mean CV ``metric`` is reported
   as ``logreg`` and named in the JSON.

Scores are the mean ± std of the per-fold scores (as ``metrics/<backbone>.json`` reports them)
and the pooled OOF score. Prints a table and writes ``paths.metrics``/baselines.json.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline import metrics
from pipeline.artifacts import write_json
from pipeline.config import load_config
from pipeline.data.competition import encode_labels
from pipeline.data.images import Cache
from pipeline.errors import PipelineError
from pipeline.data.stage_tables import read_folds

GRID = 16  # the logistic regression sees GRID x GRID block means per channel


def block_mean(images: np.ndarray, grid: int = GRID) -> np.ndarray:
    """N x H x W x C uint8 -> N x (grid*grid*C) float features: the mean of each block (edges cropped)."""
    n, height, width, channels = images.shape
    bh, bw = height // grid, width // grid
    if bh == 0 or bw == 0:
        raise PipelineError(f"images of {height}x{width} are smaller than the {grid}x{grid} grid")
    cropped = np.asarray(images[:, :bh * grid, :bw * grid], dtype=np.float32)
    return cropped.reshape(n, grid, bh, grid, bw, channels).mean(axis=(2, 4)).reshape(n, -1)


def majority(x_train, y_train, x_valid, n_classes: int) -> np.ndarray:
    proba = np.zeros((len(x_valid), n_classes))
    proba[:, np.bincount(y_train, minlength=n_classes).argmax()] = 1.0
    return proba


def logreg(class_weight):
    def fit_predict(x_train, y_train, x_valid, n_classes: int) -> np.ndarray:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, class_weight=class_weight))
        model.fit(x_train, y_train)
        proba = np.zeros((len(x_valid), n_classes))
        proba[:, model[-1].classes_] = model.predict_proba(x_valid)  # a class absent from a fold keeps 0
        return proba
    return fit_predict


def cross_validate(fit_predict, x, y, folds, n_classes: int, metric: str) -> dict:
    """Per-fold and pooled OOF scores of one baseline."""
    oof = np.zeros((len(y), n_classes))
    per_fold = []
    for fold in np.unique(folds):
        train, valid = folds != fold, folds == fold
        oof[valid] = fit_predict(x[train], y[train], x[valid], n_classes)
        per_fold.append({"fold": int(fold), "accuracy": metrics.accuracy(y[valid], oof[valid]),
                         metric: metrics.score(metric, y[valid], oof[valid])})
    result = {}
    for name in ("accuracy", metric):
        values = np.array([f[name] for f in per_fold])
        result[name] = {"mean": float(values.mean()), "std": float(values.std()),
                        "oof": metrics.score(name, y, oof)}
    return result | {"folds": per_fold}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="params.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    metric = cfg.metric

    cache = Cache.open(cfg)
    table = cache.table("train")
    fold_table = read_folds(cfg)
    fold_of = dict(zip(fold_table["id"].astype(str), fold_table["fold"]))
    ids = table["id"].astype(str)
    if set(ids) != set(fold_of):
        raise PipelineError(f"{cfg.path('folds')} and the image cache hold different ids: re-run folds")
    folds = ids.map(fold_of).to_numpy()
    y = encode_labels(table["target"], cache.class_names, "the cache")
    x = block_mean(cache.images("train"))
    n_classes = len(cache.class_names)

    results = {"majority": cross_validate(majority, x, y, folds, n_classes, metric)}
    variants = {weight or "none": cross_validate(logreg(weight), x, y, folds, n_classes, metric)
                for weight in (None, "balanced")}
    best = max(variants, key=lambda name: variants[name][metric]["mean"])
    results["logreg"] = variants[best] | {"class_weight": best,
                                          "alternative": {name: variants[name][metric] for name in variants}}

    print(f"{'baseline':<24} {'accuracy (folds)':>18} {'OOF':>7} {metric + ' (folds)':>20} {'OOF':>7}")
    rows = [("majority", results["majority"])] + [(f"logreg {GRID}x{GRID} cw={name}", variants[name])
                                                  for name in variants]
    for name, result in rows:
        acc, score = result["accuracy"], result[metric]
        print(f"{name:<24} {acc['mean']:.4f} ± {acc['std']:.4f} {acc['oof']:7.4f} "
              f"{score['mean']:>11.4f} ± {score['std']:.4f} {score['oof']:7.4f}")
    print(f"logreg reported with class_weight={best} (better mean CV {metric})")
    report = {"metric": metric, "n_images": int(len(y)), "n_folds": int(len(np.unique(folds))),
              "features": f"{GRID}x{GRID} block means x {cfg.data.channels} channel(s), standardised", **results}
    write_json(cfg.path("metrics") / "baselines.json", report)
    return report


if __name__ == "__main__":
    try:
        main()
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
