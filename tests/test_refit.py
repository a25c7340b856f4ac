"""Full-data refit: the epoch count the folds chose, a model on every training image, blended into the test."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import make_config

from pipeline import folds, infer, layout, prepare, train
from pipeline.training.kfold import FoldResult
from pipeline.training.refit import refit_epochs


def fold_result(best_epoch):
    return FoldResult(0, 0.5, best_epoch, np.array([0]), np.array([[1.0]]), [])


@pytest.mark.parametrize(("best_epochs", "expected"), [([0, 0], 1), ([4, 6], 6), ([1, 2, 2], 3), ([0, 1], 2)])
def test_refit_epochs_is_the_mean_best_epoch_count(best_epochs, expected):
    # 0-based best epochs [4, 6] are 5 and 7 epochs: mean 6; [0, 1] -> 1.5 rounds to 2 (half to even).
    assert refit_epochs([fold_result(e) for e in best_epochs]) == expected


@pytest.mark.slow
def test_refit_trains_on_every_image_and_infer_blends_it(tmp_path):
    def config(*overrides):
        return make_config(tmp_path / "work", "backbones=[lcnet_050]", "train.epochs=2", "train.refit=true",
                           "infer.tta=[]", *overrides)

    cfg = config()
    prepare.main(cfg)
    folds.main(cfg)
    report = train.main(cfg)["lcnet_050"]
    done = json.loads((layout.refit_dir(cfg, "lcnet_050") / "done.json").read_text())
    assert done["epochs"] == report["refit_epochs"] == refit_epochs_of(report)
    assert [h["epoch"] for h in done["history"]] == list(range(1, done["epochs"] + 1))
    assert train.main(cfg)["lcnet_050"]["refit_epochs"] == done["epochs"]  # a second run skips it

    tests = {}
    for weight in (0.0, 1.0, 0.25):
        infer.main(config(f"infer.refit_weight={weight}"))
        tests[weight] = pd.read_parquet(layout.preds_file(cfg, "lcnet_050")).drop(columns="id").to_numpy()
    assert not np.allclose(tests[0.0], tests[1.0])  # the refit model predicts otherwise than the folds
    np.testing.assert_allclose(tests[0.25], 0.75 * tests[0.0] + 0.25 * tests[1.0], atol=1e-9)


def refit_epochs_of(report):
    return max(1, int(round(np.mean([fold["best_epoch"] for fold in report["folds"]]))))
