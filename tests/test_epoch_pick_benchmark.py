"""benchmarks/epoch_pick.py: the optimism of keeping each fold's best epoch, by hand."""

import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import epoch_pick  # noqa: E402


def test_best_and_last_epoch_cv_and_the_optimism_by_hand():
    # fold 0: 0.3, 0.6, 0.5 (best 0.6, last 0.5); fold 1: 0.2, 0.4, 0.7 (best is last, 0.7); rows out of order.
    curve = pd.DataFrame({"epoch": [3, 1, 2, 1, 2, 3], "fold": [0, 0, 0, 1, 1, 1],
                          "macro_f1": [0.5, 0.3, 0.6, 0.2, 0.4, 0.7]})
    found = epoch_pick.pick_optimism(curve, "macro_f1")
    assert found["folds"] == 2
    assert found["cv_best"] == pytest.approx(0.65) and found["cv_last"] == pytest.approx(0.6)
    # differences 0.1 and 0: mean 0.05, std (n-1) sqrt((0.05^2 + 0.05^2) / 1)
    assert found["optimism"] == pytest.approx(0.05) and found["optimism_std"] == pytest.approx((0.005) ** 0.5)


def test_a_loss_is_best_at_its_lowest():
    curve = pd.DataFrame({"epoch": [1, 2, 3], "fold": [0, 0, 0], "log_loss": [0.9, 0.6, 0.7]})
    found = epoch_pick.pick_optimism(curve, "log_loss")
    assert (found["cv_best"], found["cv_last"]) == pytest.approx((0.6, 0.7))
    assert found["optimism"] == pytest.approx(0.1)
