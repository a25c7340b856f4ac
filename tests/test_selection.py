"""The honest score of choosing an ensembling method on OOF (pipeline.ensembling.selection), by hand."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import metrics
from pipeline.ensembling import blending, selection

# Three members, two classes: soft voting says class 0 (mean 0.597), the majority of argmaxes says class 1. On a row
# labelled 0 ("S") soft is right and hard wrong; on a row labelled 1 ("H") the other way round.
ROW = np.array([[0.99, 0.01], [0.4, 0.6], [0.4, 0.6]])


def members_for(labels) -> np.ndarray:
    return np.repeat(ROW[:, None, :], len(labels), axis=1)


def test_each_fold_is_predicted_by_the_method_its_other_folds_chose():
    # fold 0: S S, fold 1: H H, fold 2: H S (labels 0 0, 1 1, 1 0)
    labels, folds = np.array([0, 0, 1, 1, 1, 0]), np.array([0, 0, 1, 1, 2, 2])
    oof, chosen = selection.nested_choice(["soft", "hard"], members_for(labels), labels, folds, "accuracy",
                                          class_offsets=False)
    # Held fold 0: folds 1 and 2 are H H H S, hard right on 3 of 4 -> hard, wrong on both S rows.
    # Held fold 1: folds 0 and 2 are S S H S -> soft, wrong on both H rows.
    # Held fold 2: folds 0 and 1 are S S H H, a tie -> soft (listed first in METHODS): right on S, wrong on H.
    assert chosen == {0: "hard", 1: "soft", 2: "soft"}
    assert metrics.accuracy(labels, oof) == pytest.approx(1 / 6)
    # Chosen on all rows (3 S, 3 H: a tie, so soft) the same procedure claims 1/2: the choice's optimism.
    whole = selection.candidates(["soft", "hard"], members_for(labels), labels, folds, members_for(labels),
                                 "accuracy", class_offsets=False)
    assert selection.best_method_on_oof(whole, labels, "accuracy") == "soft"
    assert metrics.accuracy(labels, whole["soft"]["oof"]) == pytest.approx(1 / 2)


def noisy_members(seed: int, rows: int = 90):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, rows)
    logits = rng.normal(size=(2, rows, 3))
    logits[0, np.arange(rows), labels] += 1.5
    logits[1, np.arange(rows), labels] += 0.5
    return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True), labels, np.arange(rows) % 3


def test_with_one_learnt_method_nesting_is_its_cross_fitting():
    """One candidate leaves nothing to choose: each fold gets weights fit on the other folds, which is exactly the
    method's own cross-fitted OOF."""
    stack, labels, folds = noisy_members(0)
    oof, chosen = selection.nested_choice(["weighted"], stack, labels, folds, "macro_f1", class_offsets=False)
    expected = blending.run_method("weighted", stack, labels, folds, stack, "macro_f1")["oof"]
    np.testing.assert_allclose(oof, expected, atol=1e-12)
    assert set(chosen.values()) == {"weighted"}


def test_with_offsets_the_held_fold_is_shifted_by_offsets_fit_on_the_other_folds():
    stack, labels, folds = noisy_members(1)
    oof, chosen = selection.nested_choice(["soft"], stack, labels, folds, "macro_f1", class_offsets=True)
    soft = stack.mean(axis=0)
    expected = np.empty_like(soft)
    for fold in range(3):
        held = folds == fold
        offsets = blending.fit_class_offsets(soft[~held], labels[~held], "macro_f1")
        expected[held] = blending.apply_class_offsets(soft[held], offsets)
    np.testing.assert_allclose(oof, expected, atol=1e-12)


def test_nesting_needs_three_folds():
    stack, labels, _ = noisy_members(2, rows=20)
    with pytest.raises(ValueError, match="at least 3 folds"):
        selection.nested_choice(["soft"], stack, labels, np.arange(20) % 2, "macro_f1", class_offsets=False)
