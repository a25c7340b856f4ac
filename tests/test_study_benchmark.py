"""benchmarks/study.py: each fold's score from train's metrics, and a lever paired with the default fold by fold."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import study  # noqa: E402


def test_fold_scores_come_in_fold_order_from_trains_metrics():
    metrics = {"cv": 0.5, "fold1_macro_f1": 0.61234, "fold1_best_epoch": 3.0, "fold0_macro_f1": 0.4, "oof_f1_a": 0.2,
               "fold10_macro_f1": 0.7}
    assert study.fold_scores(metrics) == [0.4, 0.6123, 0.7]  # 0, 1, 10: by number, not as text


def test_paired_differences_by_hand():
    # Differences 0.02, -0.01, 0.03: mean 0.04/3; deviations 0.02/3, -0.07/3, 0.05/3, squares summing to
    # (4 + 49 + 25) / 90000 = 78/90000 over n-1 = 2: std sqrt(39/90000).
    found = study.paired([0.52, 0.59, 0.43], [0.50, 0.60, 0.40])
    assert found["mean"] == pytest.approx(0.04 / 3)
    assert found["std"] == pytest.approx((39 / 90000) ** 0.5)
    assert (found["better"], found["folds"]) == (2, 3)
    with pytest.raises(ValueError, match="not the same folds"):
        study.paired([0.5, 0.6], [0.5, 0.6, 0.7])


def test_the_table_pairs_each_lever_with_the_default_and_leaves_the_rest_unpaired():
    row = {"cv": 0.5, "cv_std": 0.1, "accuracy": 0.7, "lowest_class_f1": 0.1, "train_cpu_s": 10}
    results = {"reference": {**row, "changes": "old"},  # measured before fold scores were recorded
               study.DEFAULT: {**row, "changes": "default", "fold_scores": [0.5, 0.6, 0.4]},
               "longer": {**row, "changes": "longer", "fold_scores": [0.52, 0.59, 0.43]}}
    lines = {line.split(" | ")[0][2:]: line.split(" | ")[2] for line in study.table(results).splitlines()[2:]}
    assert lines == {"old": "-", "default": "-", "longer": "+0.0133 ± 0.0208 (2/3 folds)"}


def test_merge_adds_side_studies_and_the_newer_run_replaces_an_entry(tmp_path):
    results = {"reference": {"cv": 0.4}, study.DEFAULT: {"cv": 0.5}}
    found = study.merged(results, [{study.DEFAULT: {"cv": 0.51}}, {"epochs30": {"cv": 0.45}}])
    assert found == {"reference": {"cv": 0.4}, study.DEFAULT: {"cv": 0.51}, "epochs30": {"cv": 0.45}}
    assert results[study.DEFAULT] == {"cv": 0.5}  # the caller's dict is left as it was
    with pytest.raises(SystemExit, match="not in LEVERS: nonsense"):
        study.merged(results, [{"nonsense": {"cv": 0.9}}])
