"""Tests for pipeline.metrics against hand-computed values and scikit-learn."""

import json

import numpy as np
import pytest
from sklearn import metrics as sklearn_metrics

from pipeline import metrics

# Six rows, three classes. Argmax predictions [0, 1, 1, 1, 2, 0] against truth [0, 0, 1, 1, 2, 2]:
#   class 0: TP 1, FP 1 (row 5), FN 1 (row 1) -> F1 = 2/(2+1+1) = 1/2
#   class 1: TP 2, FP 1 (row 1), FN 0        -> F1 = 4/(4+1)   = 4/5
#   class 2: TP 1, FP 0,         FN 1 (row 5) -> F1 = 2/(2+1)   = 2/3
Y_TRUE = np.array([0, 0, 1, 1, 2, 2])
PROBA = np.array([
    [0.6, 0.2, 0.2],
    [0.2, 0.6, 0.2],
    [0.2, 0.6, 0.2],
    [0.2, 0.6, 0.2],
    [0.2, 0.2, 0.6],
    [0.6, 0.2, 0.2],
])


@pytest.mark.parametrize(
    "metric, expected",
    [
        ("macro_f1", (1 / 2 + 4 / 5 + 2 / 3) / 3),  # 59/90
        ("weighted_f1", (1 / 2 + 4 / 5 + 2 / 3) / 3),  # equal supports: same as macro
        ("accuracy", 4 / 6),
        ("balanced_accuracy", (1 / 2 + 2 / 2 + 1 / 2) / 3),  # recalls 1/2, 1, 1/2
        ("log_loss", -(np.log(0.6) * 4 + np.log(0.2) * 2) / 6),  # true class gets 0.6 in 4 rows
    ],
)
def test_metrics_on_hand_computed_table(metric, expected):
    assert metrics.score(metric, Y_TRUE, PROBA) == pytest.approx(expected)


def test_macro_f1_counts_a_class_absent_from_truth_and_predictions_as_zero():
    proba = np.hstack([PROBA, np.zeros((6, 1))])
    assert metrics.score("macro_f1", Y_TRUE, proba) == pytest.approx((1 / 2 + 4 / 5 + 2 / 3 + 0) / 4)


def test_log_loss_of_two_rows():
    # -(ln 0.8 + ln 0.6) / 2 = (0.223144 + 0.510826) / 2
    proba = np.array([[0.8, 0.2], [0.4, 0.6]])
    assert metrics.log_loss([0, 1], proba) == pytest.approx(0.366985, abs=1e-6)


def test_log_loss_clips_exact_zero():
    # The zero becomes 1e-15, the row renormalises to [1e-15, 1] / (1 + 1e-15): loss ~ -ln(1e-15).
    assert metrics.log_loss([0], np.array([[0.0, 1.0]])) == pytest.approx(34.538776, abs=1e-5)


@pytest.mark.parametrize(
    "predicted, expected",
    [
        ([0, 1, 2], 1.0),  # perfect
        ([2, 1, 0], -1.0),  # reversed: observed penalty 8, expected penalty 12/3 = 4, 1 - 8/4
    ],
)
def test_qwk_perfect_and_reversed(predicted, expected):
    proba = np.eye(3)[predicted]
    assert metrics.score("qwk", [0, 1, 2], proba) == pytest.approx(expected)


def test_qwk_single_class_total_agreement_is_not_nan():
    assert metrics.score("qwk", [1, 1], np.eye(3)[[1, 1]]) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "metric, reference",
    [
        ("macro_f1", lambda y, p, k: sklearn_metrics.f1_score(
            y, p, average="macro", labels=range(k), zero_division=0)),
        ("weighted_f1", lambda y, p, k: sklearn_metrics.f1_score(
            y, p, average="weighted", labels=range(k), zero_division=0)),
        ("accuracy", lambda y, p, k: sklearn_metrics.accuracy_score(y, p)),
        ("qwk", lambda y, p, k: sklearn_metrics.cohen_kappa_score(y, p, labels=range(k), weights="quadratic")),
    ],
)
def test_label_metrics_agree_with_scikit_learn(seed, metric, reference):
    random = np.random.default_rng(seed)
    n_classes = 5
    y_true = random.integers(0, n_classes - 1, size=60)  # class 4 never true
    proba = random.dirichlet(np.ones(n_classes), size=60)
    expected = reference(y_true, proba.argmax(axis=1), n_classes)
    assert metrics.score(metric, y_true, proba) == pytest.approx(expected)


def test_balanced_accuracy_and_log_loss_agree_with_scikit_learn():
    random = np.random.default_rng(3)
    y_true = random.integers(0, 4, size=80)
    proba = random.dirichlet(np.ones(4), size=80)
    assert metrics.score("balanced_accuracy", y_true, proba) == pytest.approx(
        sklearn_metrics.balanced_accuracy_score(y_true, proba.argmax(axis=1)))
    assert metrics.score("log_loss", y_true, proba) == pytest.approx(
        sklearn_metrics.log_loss(y_true, proba, labels=range(4)))


@pytest.mark.parametrize(
    "metric, greater",
    [("macro_f1", True), ("accuracy", True), ("weighted_f1", True), ("log_loss", False),
     ("balanced_accuracy", True), ("qwk", True)],
)
def test_direction(metric, greater):
    assert metrics.greater_is_better(metric) is greater
    assert metrics.better(metric, 0.9, 0.1) is greater
    assert metrics.better(metric, 0.1, 0.9) is not greater
    assert metrics.better(metric, 0.5, 0.5) is False


@pytest.mark.parametrize("call", [
    lambda: metrics.score("f2", Y_TRUE, PROBA),
    lambda: metrics.greater_is_better("f2"),
    lambda: metrics.better("f2", 1.0, 0.0),
])
def test_unknown_metric_names_the_valid_ones(call):
    with pytest.raises(ValueError, match=r"macro_f1.*log_loss.*qwk"):
        call()


def test_labels_outside_the_columns_are_rejected():
    with pytest.raises(ValueError, match=r"0..2"):
        metrics.score("accuracy", [0, 3], np.eye(3)[[0, 1]])


def test_summary_is_plain_json_serialisable_floats():
    result = metrics.summary(Y_TRUE, PROBA, ["cat", "dog", "fox"])
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["macro_f1"] == pytest.approx(59 / 90)
    assert result["per_class_f1"] == pytest.approx({"cat": 1 / 2, "dog": 4 / 5, "fox": 2 / 3})
    assert type(result["log_loss"]) is float
    assert all(type(value) is float for value in result["per_class_f1"].values())
    json.dumps(result)


def test_summary_rejects_wrong_number_of_class_names():
    with pytest.raises(ValueError, match="class_names"):
        metrics.summary(Y_TRUE, PROBA, ["cat", "dog"])


def test_predict_labels_is_argmax():
    np.testing.assert_array_equal(metrics.predict_labels(PROBA), [0, 1, 1, 1, 2, 0])


def test_numbers_only_keeps_finite_numbers():
    values = {"a": 1, "b": 0.5, "c": np.float32(0.25), "name": "x", "flag": True, "gone": float("nan"),
              "none": None, "nested": {"d": 1}}
    assert metrics.numbers_only(values) == {"a": 1.0, "b": 0.5, "c": 0.25}


def test_train_record_is_flat_numbers():
    report = {"backbone": "b", "metric": "macro_f1", "cv": 0.5, "cv_std": 0.1,
              "oof": {"accuracy": 0.7, "macro_f1": 0.45, "log_loss": 0.9, "per_class_f1": {"p000": 0.8, "p100": 0.1}},
              "folds": [{"fold": 0, "macro_f1": 0.4, "best_epoch": 3}, {"fold": 1, "macro_f1": 0.6, "best_epoch": 5}]}
    assert metrics.train_record(report) == {f"b_{key}": value for key, value in {
        "cv": 0.5, "cv_std": 0.1, "oof_accuracy": 0.7, "oof_macro_f1": 0.45, "oof_log_loss": 0.9,
        "oof_f1_p000": 0.8, "oof_f1_p100": 0.1, "fold0_macro_f1": 0.4, "fold0_best_epoch": 3.0,
        "fold1_macro_f1": 0.6, "fold1_best_epoch": 5.0}.items()}
