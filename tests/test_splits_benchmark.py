"""benchmarks/splits.py: the whole-test scorer by hand, the folder copy, and one smoke run of the chain."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import splits  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.layout import overrides_under  # noqa: E402


def test_whole_test_scores_by_hand(tmp_path):
    cfg = load_config(None, [*overrides_under(tmp_path), "backbones=[lcnet_050,resnet10t]", "embed.enabled=false"])
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "meta.json").write_text(json.dumps({"id_col": "img", "target_col": "y", "class_names": ["a", "b"]}))
    pd.DataFrame({"img": ["1", "2", "3", "4"], "y": ["a", "a", "b", "b"],
                  "Usage": ["Public", "Private", "Public", "Private"]}).to_csv(cache / "solution.csv", index=False)
    (tmp_path / "submissions").mkdir()
    # Rows in another order than the solution's; 3 of 4 right, class b recalled once of twice.
    pd.DataFrame({"img": ["4", "3", "2", "1"], "y": ["a", "b", "a", "a"]}).to_csv(
        tmp_path / "submissions" / "submission.csv", index=False)
    (tmp_path / "preds").mkdir()
    pd.DataFrame({"id": ["2", "1", "4", "3"], "a": [0.9, 0.6, 0.7, 0.8], "b": [0.1, 0.4, 0.3, 0.2]}).to_parquet(
        tmp_path / "preds" / "lcnet_050.parquet")
    pd.DataFrame({"id": ["3", "4", "1", "2"], "a": [0.2, 0.4, 0.7, 0.5], "b": [0.8, 0.6, 0.3, 0.4]}).to_parquet(
        tmp_path / "preds" / "resnet10t.parquet")
    (tmp_path / "features").mkdir()  # the features member (on by default): a, b, b, b for ids 1-4
    pd.DataFrame({"id": ["1", "2", "3", "4"], "a": [0.6, 0.4, 0.1, 0.3], "b": [0.4, 0.6, 0.9, 0.7]}).to_parquet(
        tmp_path / "features" / "test.parquet")
    scores = splits.whole_test_scores(cfg)
    assert scores["test_accuracy"] == pytest.approx(0.75)
    # F1(a) = 2*2/(2*2+1+0) = 0.8, F1(b) = 2*1/(2*1+0+1) = 2/3.
    assert scores["test_macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    # Each member alone, from its test probabilities (rows in yet another order): lcnet_050 says "a" everywhere
    # (F1(a) = 2*2/(2*2+0+2) = 2/3, F1(b) = 0), resnet10t is right everywhere, so the best member beats the ensemble.
    assert scores["lcnet_050_test_accuracy"] == pytest.approx(0.5)
    assert scores["lcnet_050_test_macro_f1"] == pytest.approx(1 / 3)
    assert scores["resnet10t_test_accuracy"] == scores["resnet10t_test_macro_f1"] == pytest.approx(1.0)
    assert scores["best_member_test_macro_f1"] == pytest.approx(1.0)
    # F1(a) = 2*1/(2*1+0+1) = 2/3, F1(b) = 2*2/(2*2+1+0) = 0.8
    assert scores["features_test_accuracy"] == pytest.approx(0.75)
    assert scores["features_test_macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_folder_copy_renames_columns_and_labels(tmp_path):
    source = tmp_path / "elpv"
    for split in ("train", "test"):
        (source / split).mkdir(parents=True)
        (source / split / f"{split}1.png").write_bytes(b"png")
    pd.DataFrame({"id": ["train1"], "defect": ["p067"], "type": ["mono"]}).to_csv(source / "train.csv", index=False)
    pd.DataFrame({"id": ["test1"], "defect": ["p000"]}).to_csv(source / "sample_submission.csv", index=False)
    pd.DataFrame({"id": ["test1"], "defect": ["p100"], "Usage": ["Public"]}).to_csv(source / "solution.csv",
                                                                                  index=False)
    target = splits.folder_copy(source, tmp_path / "copy")
    train = pd.read_csv(target / "train.csv")
    assert list(train.columns) == ["cell_id", "defect_grade", "type"]
    assert train["defect_grade"].tolist() == ["likely defective"]
    assert pd.read_csv(target / "solution.csv")["defect_grade"].tolist() == ["defective"]
    assert (target / "test" / "test1.png").read_bytes() == b"png"


@pytest.mark.slow
def test_splits_runs_the_chain_on_a_seed_and_a_folder_copy(tmp_path):
    out = tmp_path / "splits.json"
    # One backbone, no search: what is tested here (the runs, their scores and the folder copy) is not per
    # backbone (the members' own scores are tested by hand above), and the two whole chains run in less time.
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "splits.py"), "--seeds", "3", "--folder-copy",
         "--config", str(ROOT / "configs" / "smoke.yaml"), "--work", str(tmp_path / "runs"), "--out", str(out),
         "data.workers=1", "backbones=[lcnet_050]", "tune.enabled=false"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = json.loads(out.read_text())["runs"]
    assert [run["run"] for run in runs] == ["seed3", "folder (seed 3)"]
    for run in runs:
        assert 0 <= run["test_accuracy"] <= 1 and 0 <= run["test_macro_f1"] <= 1
        assert run["gap"] == pytest.approx(run["cv"] - run["test_macro_f1"])
    assert "mean ± std" in result.stdout
    copy = pd.read_csv(tmp_path / "runs" / "folder_competition" / "train.csv")
    assert set(copy["defect_grade"]) <= set(splits.FOLDER_LABELS.values())
    assert np.isfinite([run["cv"] for run in runs]).all()
