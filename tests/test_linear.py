"""The per-fold logistic regression of the members that train no network (pipeline/training/linear.py): class weights by
hand, and a cross-fit that never predicts a row with a model that saw it."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import DataError
from pipeline.training import embedding, linear


def test_class_weights_by_hand():
    labels = np.array([0, 0, 0, 0, 1])
    # power 1: 1/4 and 1, scaled to mean 1 over the labels: (4 * 0.25 + 1) / 5 = 0.4 -> 0.625, 2.5
    assert linear.balanced_class_weights(labels, 3, 1.0) == pytest.approx({0: 0.625, 1: 2.5})
    # power 0.5: 1/2 and 1, mean (4 * 0.5 + 1) / 5 = 0.6; class 2 is absent and gets no weight
    assert linear.balanced_class_weights(labels, 3, 0.5) == pytest.approx({0: 0.5 / 0.6, 1: 1 / 0.6})


def test_cross_fit_never_predicts_a_row_with_a_model_that_saw_it():
    """Each row has a feature of its own (an identity matrix) and a random label: a model that saw the row
    memorises it, one that did not can only guess. The OOF must guess."""
    rng = np.random.default_rng(0)
    n = 60
    labels = rng.integers(0, 2, n)
    row_folds = np.arange(n) % 3
    x = np.eye(n)
    oof, test, fold_rows, _ = linear.cross_fit_logistic(x, labels, row_folds, x[:5], 2, inverse_regularisation=100.0,
                                                 balance_power=0.0)
    memorised = linear.fit_predict(x, labels, [x], 2, 100.0, 0.0)[0]
    assert (memorised.argmax(1) == labels).mean() == 1.0
    assert (oof.argmax(1) == labels).mean() < 0.75
    np.testing.assert_allclose(oof.sum(1), 1.0)
    assert sorted(np.concatenate([rows for _, rows in fold_rows]).tolist()) == list(range(n))
    # the test rows are the folds' models averaged: rows 0-4 were memorised by the two folds that trained on each
    assert test.shape == (5, 2) and np.allclose(test.sum(1), 1.0)


def test_cross_fit_learns_a_separable_problem():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], 30)
    x = np.eye(3)[labels] * 3 + rng.normal(scale=0.5, size=(90, 3))
    oof, _, _, _ = linear.cross_fit_logistic(x, labels, np.arange(90) % 5, x[:3], 3, 1.0, 0.5)
    assert (oof.argmax(1) == labels).mean() > 0.95


@pytest.mark.parametrize("n_classes, present", [(2, [0, 1]), (4, [0, 1, 3]), (3, [0, 2])])
def test_the_saved_regressions_predict_as_scikit_learn_did(tmp_path, n_classes, present):
    """What the kernel computes without scikit-learn (``embedding.folds_proba`` on the saved arrays) is what the
    cross-fit predicted for the test rows: binary (a sigmoid), multiclass (a softmax), a class no fold saw."""
    rng = np.random.default_rng(2)
    labels = rng.choice(present, 80)
    x = (rng.normal(size=(80, 6)) + labels[:, None]).astype(np.float32)
    x_test = rng.normal(size=(7, 6)).astype(np.float32) * 3
    _, test, _, fitted = linear.cross_fit_logistic(x, labels, np.arange(80) % 3, x_test, n_classes, 0.5, 0.5)
    embedding.save_regressions(tmp_path / "r.npz", fitted, {"class_names": list("abcd")[:n_classes]})
    meta, folds = embedding.load_regressions(tmp_path / "r.npz")
    assert meta["folds"] == 3 and meta["class_names"] == list("abcd")[:n_classes]
    np.testing.assert_allclose(embedding.folds_proba(folds, x_test, n_classes), test, rtol=0, atol=1e-6)
    assert set(np.flatnonzero(test.sum(0))) == set(present)


def test_damaged_regressions_are_a_data_error(tmp_path):
    (tmp_path / "r.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="re-run its stage"):
        embedding.load_regressions(tmp_path / "r.npz")
    with pytest.raises(DataError, match="missing"):
        embedding.load_regressions(tmp_path / "none.npz")
