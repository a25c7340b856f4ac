"""benchmarks/neighbours.py: a nearest-neighbour member's OOF probabilities, by hand."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import neighbours  # noqa: E402


def test_images_are_averaged_over_their_areas():
    image = np.array([[[0], [2]], [[4], [6]]], dtype=np.uint8)[None]  # one 2 x 2 grey image
    assert neighbours.downsampled(image, 1).tolist() == [[3.0]]
    assert neighbours.downsampled(image, 2).tolist() == [[0.0, 2.0, 4.0, 6.0]]


def test_rows_lose_the_mean_image_then_their_own_mean():
    rows = np.array([[1.0, 2.0, 6.0]])
    # minus [1, 1, 1] -> [0, 1, 5], minus its mean 2 -> [-2, -1, 3]
    assert neighbours.centred(rows, np.ones(3)).tolist() == [[-2.0, -1.0, 3.0]]


def test_weights_fall_with_the_distance_beyond_the_nearest():
    weights = neighbours.nearest_weights(0.5)(np.array([[0.1, 0.3, 1.1]]))
    assert weights == pytest.approx(np.array([[1.0, np.exp(-0.4), np.exp(-2.0)]]))


def test_each_row_is_predicted_by_the_other_folds_only():
    # Fold 0 holds two pairs of opposite rows, each pair once with each label; fold 1 one such pair, labelled 0 and 1.
    # Every fold's mean image is zero and every row's mean is zero, so the cosine distance between two rows of the
    # same direction is 0 and of opposite directions 2.
    plus, minus = np.array([2.0, -2.0, 0.0]), np.array([-2.0, 2.0, 0.0])
    x = np.stack([plus, minus, plus, minus, plus / 2, minus / 2])
    labels = np.array([0, 1, 1, 0, 0, 1])
    folds = np.array([0, 0, 0, 0, 1, 1])
    oof = neighbours.neighbour_oof(x, labels, folds, n_classes=2, k=2, temperature=1.0)
    # Fold 0's rows see fold 1's two rows only: the same direction at 0 (weight 1), the opposite at 2 (weight e^-2).
    near, far = 1 / (1 + np.exp(-2.0)), np.exp(-2.0) / (1 + np.exp(-2.0))
    assert oof[:4] == pytest.approx(np.array([[near, far], [far, near], [near, far], [far, near]]))
    # Fold 1's rows see fold 0's: two rows at distance 0, one of each label.
    assert oof[4:] == pytest.approx(np.full((2, 2), 0.5))


def test_a_folder_that_is_no_run_exits_2_naming_what_is_missing(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "neighbours.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(tmp_path / "cache" / "meta.json") in result.stderr
