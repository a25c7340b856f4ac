"""Competition metrics on integer labels and class-probability matrices.

Every metric takes ``y_true`` (N integer labels in ``0..C-1``) and ``proba``
(an N x C matrix whose rows sum to 1) and returns a float. Label-based metrics
score the argmax of ``proba``. All C classes always count, including classes
absent from ``y_true`` (an absent class that is also never predicted has F1 0,
as scikit-learn gives with ``labels=range(C)`` and ``zero_division=0``).

The label-based metrics are computed from one confusion matrix with numpy
rather than by calling scikit-learn each time: the ensembling searches score
thousands of candidates, and scikit-learn's input validation dominates at that
rate. The tests cross-check every metric against scikit-learn.
"""

import numpy as np

LOG_LOSS_EPSILON = 1e-15


def _check_inputs(y_true, proba):
    """Validate and convert to (int labels of length N, float N x C matrix)."""
    proba = np.asarray(proba, dtype=float)
    if proba.ndim != 2:
        raise ValueError(f"proba must be a 2-D N x C array, got shape {proba.shape}")
    y_true = np.asarray(y_true)
    if y_true.ndim != 1 or len(y_true) != len(proba):
        raise ValueError(
            f"y_true must be 1-D with one label per row of proba ({len(proba)}), "
            f"got shape {y_true.shape}"
        )
    if len(y_true) == 0:
        raise ValueError("y_true is empty")
    if not np.issubdtype(y_true.dtype, np.integer):
        if not np.all(np.equal(np.mod(y_true, 1), 0)):
            raise ValueError("y_true must hold integer class labels")
        y_true = y_true.astype(int)
    n_classes = proba.shape[1]
    if y_true.min() < 0 or y_true.max() >= n_classes:
        raise ValueError(
            f"y_true labels must lie in 0..{n_classes - 1} (proba has {n_classes} columns), "
            f"got range {y_true.min()}..{y_true.max()}"
        )
    if not np.all(np.isfinite(proba)):
        raise ValueError("proba contains NaN or infinite values")
    return y_true, proba


def predict_labels(proba) -> np.ndarray:
    """Argmax class per row of an N x C probability matrix -> N integer labels."""
    proba = np.asarray(proba, dtype=float)
    if proba.ndim != 2:
        raise ValueError(f"proba must be a 2-D N x C array, got shape {proba.shape}")
    return np.argmax(proba, axis=1)


def _confusion(y_true, proba) -> np.ndarray:
    """C x C confusion matrix (rows: truth, columns: argmax prediction)."""
    y_true, proba = _check_inputs(y_true, proba)
    n_classes = proba.shape[1]
    predicted = np.argmax(proba, axis=1)
    counts = np.bincount(y_true * n_classes + predicted, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes).astype(float)


def _per_class_f1(confusion: np.ndarray) -> np.ndarray:
    true_positive = np.diag(confusion)
    denominator = confusion.sum(axis=0) + confusion.sum(axis=1)
    # 2TP / (2TP + FP + FN) == 2TP / (predicted + actual); 0 when the class never occurs.
    return np.divide(
        2 * true_positive, denominator, out=np.zeros_like(true_positive), where=denominator > 0
    )


def macro_f1(y_true, proba) -> float:
    """Unweighted mean of the per-class F1 of the argmax prediction."""
    return float(_per_class_f1(_confusion(y_true, proba)).mean())


def weighted_f1(y_true, proba) -> float:
    """Per-class F1 of the argmax prediction, averaged weighted by class support."""
    confusion = _confusion(y_true, proba)
    support = confusion.sum(axis=1)
    return float((_per_class_f1(confusion) * support).sum() / support.sum())


def accuracy(y_true, proba) -> float:
    """Fraction of rows whose argmax equals the label."""
    confusion = _confusion(y_true, proba)
    return float(np.trace(confusion) / confusion.sum())


def balanced_accuracy(y_true, proba) -> float:
    """Mean recall over the classes present in y_true (recall of an absent class is undefined)."""
    confusion = _confusion(y_true, proba)
    support = confusion.sum(axis=1)
    present = support > 0
    return float((np.diag(confusion)[present] / support[present]).mean())


def quadratic_weighted_kappa(y_true, proba) -> float:
    """Cohen's kappa of the argmax with quadratic weights (for ordinal classes)."""
    confusion = _confusion(y_true, proba)
    n_classes = confusion.shape[0]
    index = np.arange(n_classes)
    penalty = (index[:, None] - index[None, :]) ** 2
    expected = np.outer(confusion.sum(axis=1), confusion.sum(axis=0)) / confusion.sum()
    expected_penalty = (penalty * expected).sum()
    if expected_penalty == 0:
        # Only when truth and prediction are one and the same single class: kappa is 0/0,
        # and agreement is total, so report it as perfect rather than NaN.
        return 1.0
    return float(1.0 - (penalty * confusion).sum() / expected_penalty)


def log_loss(y_true, proba) -> float:
    """Mean negative log probability of the true class (clipped to [1e-15, 1], rows renormalised)."""
    y_true, proba = _check_inputs(y_true, proba)
    clipped = np.clip(proba, LOG_LOSS_EPSILON, 1.0)
    clipped = clipped / clipped.sum(axis=1, keepdims=True)
    return float(-np.log(clipped[np.arange(len(y_true)), y_true]).mean())


METRICS = {
    "macro_f1": (macro_f1, True),
    "accuracy": (accuracy, True),
    "weighted_f1": (weighted_f1, True),
    "log_loss": (log_loss, False),
    "balanced_accuracy": (balanced_accuracy, True),
    "qwk": (quadratic_weighted_kappa, True),
}


def _lookup(metric: str):
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid metrics: {', '.join(METRICS)}")
    return METRICS[metric]


def score(metric: str, y_true, proba) -> float:
    """Value of the named metric for labels y_true (N) and probabilities proba (N x C)."""
    function, _ = _lookup(metric)
    return function(y_true, proba)


def greater_is_better(metric: str) -> bool:
    """True when higher values of the named metric are better."""
    return _lookup(metric)[1]


def better(metric: str, a: float, b: float) -> bool:
    """True when score a is strictly better than score b under the metric's direction."""
    if greater_is_better(metric):
        return a > b
    return a < b


def summary(y_true, proba, class_names: list) -> dict:
    """Accuracy, macro F1, log loss and per-class F1 (keyed by class name) as plain floats."""
    y_true, proba = _check_inputs(y_true, proba)
    if len(class_names) != proba.shape[1]:
        raise ValueError(
            f"class_names has {len(class_names)} names but proba has {proba.shape[1]} columns"
        )
    per_class = _per_class_f1(_confusion(y_true, proba))
    return {
        "accuracy": accuracy(y_true, proba),
        "macro_f1": float(per_class.mean()),
        "log_loss": log_loss(y_true, proba),
        "per_class_f1": {str(name): float(value) for name, value in zip(class_names, per_class, strict=True)},
    }


def numbers_only(values: dict) -> dict:
    """The items of a flat ``values`` that are numbers (not bools, not NaN): what a DVC metrics file holds, so
    that ``dvc exp show`` and ``dvc metrics diff`` can compare every column."""
    return {key: float(value) for key, value in values.items()
            if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and np.isfinite(value)}


def train_record(report: dict) -> dict:
    """train's report -> its flat metrics file: CV mean and spread, OOF figures, each class's OOF F1, and each
    fold's score and best epoch, every key prefixed by the backbone (``lcnet_050_cv``, ``lcnet_050_fold0_best_epoch``),
    so that ``dvc exp show`` names each column by its key alone, not by its file and key."""
    metric, oof = report["metric"], report["oof"]
    record = {"cv": report["cv"], "cv_std": report["cv_std"],
              **{f"oof_{name}": oof[name] for name in dict.fromkeys(("accuracy", "macro_f1", "log_loss", metric))},
              **{f"oof_f1_{name}": value for name, value in oof["per_class_f1"].items()}}
    for fold in report["folds"]:
        record |= {f"fold{fold['fold']}_{metric}": fold[metric], f"fold{fold['fold']}_best_epoch": fold["best_epoch"]}
    record |= {key: report[key] for key in ("refit_epochs", "round1_cv", "round1_cv_std") if key in report}
    return {f"{report['backbone']}_{key}": value for key, value in numbers_only(record).items()}

