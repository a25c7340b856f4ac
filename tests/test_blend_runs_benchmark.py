"""benchmarks/blend_runs.py: the CV of averaging runs' OOF probabilities, by hand."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import blend_runs  # noqa: E402

from pipeline.errors import DataError  # noqa: E402


def test_fold_cv_by_hand():
    # fold 0: truth [0, 1], predicted [0, 1]: macro-F1 1; fold 1: truth [0, 1], predicted [0, 0]: F1 2/3 and 0 -> 1/3.
    labels = np.array([0, 1, 0, 1])
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4]])
    mean, std = blend_runs.fold_cv(labels, proba, np.array([0, 0, 1, 1]), "macro_f1")
    assert mean == pytest.approx(2 / 3) and std == pytest.approx(1 / 3)  # population std, as train's


def test_runs_are_aligned_on_ids_and_averaged_rows_mix_them():
    folds = pd.DataFrame({"id": ["a", "b"], "label": ["p1", "p0"], "fold": [0, 1]})
    run1 = pd.DataFrame({"id": ["b", "a"], "fold": [1, 0], "p0": [0.9, 0.4], "p1": [0.1, 0.6]})  # other row order
    run2 = pd.DataFrame({"id": ["a", "b"], "fold": [0, 1], "p0": [0.8, 0.5], "p1": [0.2, 0.5]})
    classes, labels, fold, (first, second) = blend_runs.aligned(folds, [run1, run2])
    assert classes == ["p0", "p1"] and labels.tolist() == [1, 0] and fold.tolist() == [0, 1]
    assert first.tolist() == [[0.4, 0.6], [0.9, 0.1]] and second.tolist() == [[0.8, 0.2], [0.5, 0.5]]
    # id a: run 1 says p1 (0.6), run 2 says p0 (0.8): their mean [0.6, 0.4] says p0.
    assert np.mean([first, second], axis=0)[0].tolist() == pytest.approx([0.6, 0.4])
    with pytest.raises(DataError, match="run 2 lacks ids"):
        blend_runs.aligned(folds, [run1, run2.iloc[:1]])
