"""A logistic regression per fold on fixed features: the model of the members that learn no network weights.

The features stage (k-means patch features) and the embed stage (a frozen pretrained backbone's pooled features)
both turn images into vectors and fit one scikit-learn logistic regression per fold. This module is that shared
part: the class weights, one fold's fit and predictions, the cross-fit over the folds, and the member's report and
flat metrics record. Each row of the OOF comes from the model of the fold that held it out.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import numpy as np
from joblib import Parallel, cpu_count, delayed
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from pipeline import layout, metrics
from pipeline.artifacts import probability_table, write_json, write_parquet
from pipeline.config import Config
from pipeline.data.competition import encode_labels
from pipeline.data.images import Cache
from pipeline.data.stage_tables import read_folds
from pipeline.errors import DataError


def training_rows(cfg: Config, cache: Cache):
    """(ids, integer labels, folds, cache row of each) of the training images folds.csv assigns, in its order."""
    folds = read_folds(cfg)
    table = cache.table("train")
    row_of = {str(i): r for r, i in enumerate(table["id"].astype(str))}
    missing = [i for i in folds["id"] if i not in row_of]
    if missing:
        raise DataError(f"{layout.folds_file(cfg)} names {len(missing)} id(s) the image cache does not hold "
                        f"({', '.join(missing[:5])}): re-run prepare and folds")
    labels = encode_labels(folds["label"], cache.class_names, str(layout.folds_file(cfg)))
    return folds["id"].to_numpy(), labels, folds["fold"].to_numpy(), np.array([row_of[i] for i in folds["id"]])


def balanced_class_weights(labels: np.ndarray, n_classes: int, power: float) -> dict[int, float]:
    """Weight count**-power per class present, scaled so that the mean weight over ``labels`` is 1."""
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = counts[present] ** -power
    weights /= weights[labels].mean()
    return {int(c): float(weights[c]) for c in np.flatnonzero(present)}


def fit_fold(x_train, y_train, x_predict: list[np.ndarray], n_classes: int, inverse_regularisation: float,
             balance_power: float) -> tuple[list[np.ndarray], dict]:
    """Standardise on the training rows, fit a class-weighted logistic regression, predict every array of
    ``x_predict``; a class absent from the training rows keeps probability 0. Returns the predictions and the fitted
    arrays (``embedding.FOLD_ARRAYS``: the standardisation's mean and scale, the coefficients, intercepts and class
    of each row) that ``embedding.regression_proba`` predicts with."""
    scaler = StandardScaler().fit(x_train)
    model = LogisticRegression(C=inverse_regularisation, max_iter=3000,
                               class_weight=balanced_class_weights(y_train, n_classes, balance_power))
    model.fit(scaler.transform(x_train), y_train)
    predictions = []
    for x in x_predict:
        proba = np.zeros((len(x), n_classes))
        proba[:, model.classes_] = model.predict_proba(scaler.transform(x))
        predictions.append(proba / proba.sum(axis=1, keepdims=True))  # float32 features sum to 1 +- 1e-7 only
    fitted = {"mean": scaler.mean_, "scale": scaler.scale_, "coef": model.coef_, "intercept": model.intercept_,
              "classes": model.classes_.astype(np.int64)}
    return predictions, fitted


def fit_predict(x_train, y_train, x_predict: list[np.ndarray], n_classes: int, inverse_regularisation: float,
                balance_power: float) -> list[np.ndarray]:
    """:func:`fit_fold`'s predictions."""
    return fit_fold(x_train, y_train, x_predict, n_classes, inverse_regularisation, balance_power)[0]


def cross_fit_folds(fold_features: Callable, labels, folds, n_classes: int, inverse_regularisation: float,
                    balance_power: float):
    """(OOF probabilities, test probabilities: the folds' models averaged, each fold's validation rows, each fold's
    fitted arrays in the order of the sorted fold names).

    ``fold_features(valid)``, called once per fold in that order, gives one fold's (training-image features,
    test-image features), computed with what that fold may see (the rows where ``valid`` is False); the same arrays
    for every fold when the features learn nothing from the images. The regressions run side by side on one BLAS
    thread each: these small fits run 2.7 times slower on two BLAS threads than on one, and the result does not
    depend on how many run at once.
    """
    fold_names = np.unique(folds)
    valid_rows = [folds == fold for fold in fold_names]
    jobs = []
    for valid in valid_rows:
        x, x_test = fold_features(valid)
        jobs.append(delayed(fit_fold)(x[~valid], labels[~valid], [x[valid], x_test], n_classes,
                                      inverse_regularisation, balance_power))
    with threadpool_limits(1):
        fitted = Parallel(n_jobs=min(len(fold_names), cpu_count()), prefer="threads")(jobs)
    oof = np.zeros((len(labels), n_classes))
    test = 0.0
    for valid, ((fold_oof, fold_test), _) in zip(valid_rows, fitted):
        oof[valid] = fold_oof
        test = test + fold_test / len(fold_names)
    fold_rows = [(int(fold), np.flatnonzero(valid)) for fold, valid in zip(fold_names, valid_rows)]
    return oof, test, fold_rows, [arrays for _, arrays in fitted]


def cross_fit_logistic(x, labels, folds, x_test, n_classes: int, inverse_regularisation: float, balance_power: float):
    """:func:`cross_fit_folds` on features that are the same for every fold."""
    return cross_fit_folds(lambda valid: (x, x_test), labels, folds, n_classes, inverse_regularisation,
                           balance_power)


def report(metric: str, labels, oof, fold_rows, class_names) -> dict:
    """The member's CV (mean ± sample std over folds, as train reports a backbone's), OOF figures, per-fold scores."""
    per_fold = [{"fold": fold, metric: metrics.score(metric, labels[rows], oof[rows])} for fold, rows in fold_rows]
    scores = np.array([f[metric] for f in per_fold])
    oof_summary = metrics.summary(labels, oof, class_names) | {metric: metrics.score(metric, labels, oof)}
    return {"cv": float(scores.mean()), "cv_std": float(scores.std(ddof=1)) if len(scores) > 1 else 0.0,
            "oof": oof_summary, "folds": per_fold}


def record(member: str, result: dict, metric: str) -> dict:
    """The flat metrics file, every key prefixed by the member's name (as train's are by the backbone)."""
    flat = {"enabled": 1, "cv": result["cv"], "cv_std": result["cv_std"],
            **{f"oof_{name}": result["oof"][name] for name in dict.fromkeys(("accuracy", "macro_f1", metric))},
            **{f"oof_f1_{name}": value for name, value in result["oof"]["per_class_f1"].items()},
            **{f"fold{f['fold']}_{metric}": f[metric] for f in result["folds"]}}
    return {f"{member}_{key}": float(value) for key, value in flat.items()}


def write_disabled(folder: Path, member: str, metrics_file: Path) -> dict:
    """A disabled member's outputs: a note in its folder and ``{"<member>_enabled": 0}``; the ensemble leaves it out."""
    (folder / layout.MEMBER_NOTE).write_text(f"{member}.enabled is false: the ensemble has no {member} member\n")
    write_json(metrics_file, {f"{member}_enabled": 0})
    print(f"{member}: disabled ({member}.enabled=false)", file=sys.stderr)
    return {"enabled": False}


def write_member(folder: Path, member: str, metrics_file: Path, metric: str, cache: Cache, ids, labels, folds,
                 oof, test, fold_rows) -> dict:
    """A member's OOF and test tables (the contract of a backbone's) and its flat metrics; returns its report."""
    result = report(metric, labels, oof, fold_rows, cache.class_names)
    write_parquet(folder / layout.MEMBER_OOF, probability_table(ids, oof, cache.class_names, folds))
    write_parquet(folder / layout.MEMBER_TEST,
                  probability_table(cache.table("test")["id"].astype(str), test, cache.class_names))
    write_json(metrics_file, record(member, result, metric))
    return result
