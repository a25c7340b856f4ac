"""Checkpoints load with weights_only: a pulled model cannot run code, and NumPy values survive the trip."""

import numpy as np
import pytest
import torch

from pipeline.errors import DataError
from pipeline.training.checkpoints import load_checkpoint, save_checkpoint


class RunsCode:
    """Unpickling this calls ``touch`` on a file: what a malicious checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_numpy_arrays_and_scalars_come_back_as_they_were(tmp_path):
    payload = {"best_proba": np.arange(6, dtype=np.float32).reshape(2, 3), "best_score": np.float64(0.25),
               "history": [{"epoch": np.int64(1), "macro_f1": np.float32(0.5)}], "model": {"w": torch.ones(2)}}
    save_checkpoint(tmp_path / "c.pt", payload)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert isinstance(loaded["best_proba"], np.ndarray) and loaded["best_proba"].dtype == np.float32
    np.testing.assert_array_equal(loaded["best_proba"], payload["best_proba"])
    assert loaded["best_score"] == 0.25 and loaded["history"] == [{"epoch": 1, "macro_f1": 0.5}]
    assert torch.equal(loaded["model"]["w"], torch.ones(2))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    touched = tmp_path / "ran"
    torch.save({"model": {}, "trap": RunsCode(touched)}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match=r"evil.pt holds more than tensors and plain values .*could run code"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not touched.exists()
