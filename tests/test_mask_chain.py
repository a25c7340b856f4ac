"""The mask competition's own shape end to end: three heads (mask, gender, age) composed into 18 classes."""

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_config, make_mask_competition

from pipeline import ensemble, features, folds, infer, layout, prepare, submit, train
from pipeline.data.images import Cache
from pipeline.training.checkpoints import load_fold_model

pytestmark = pytest.mark.slow


def test_prepare_to_submit_with_three_heads(tmp_path):
    competition = make_mask_competition(tmp_path / "mask", people=18)
    cfg = make_config(tmp_path / "work", "data.source=folder", f"data.dir={competition}", "data.layout=mask",
                      "data.head_cols=[mask,gender,age]", "data.compose='mask*6 + gender*3 + age'",
                      "data.channels=3", "data.image_size=24", "backbones=[lcnet_050]", "infer.tta=[]",
                      "train.epochs=2", "features.enabled=false", "embed.enabled=false")
    prepare.main(cfg)
    folds.main(cfg)
    fold_table = pd.read_csv(layout.folds_file(cfg), dtype=str)
    assert fold_table.groupby("group")["fold"].nunique().max() == 1  # a person never straddles two folds
    train.main(cfg)
    infer.main(cfg)
    features.main(cfg)
    ensemble.main(cfg)
    result = submit.main(cfg)

    # By hand: each fold's three heads as softmaxes, class 6*mask + 3*gender + age as their product,
    # renormalised, averaged over the folds.
    cache = Cache.open(cfg)
    images = torch.from_numpy(np.ascontiguousarray(cache.images("test").transpose(0, 3, 1, 2)))
    expected = np.zeros((len(images), 18))
    for fold in (0, 1):
        path = layout.fold_dir(cfg, "lcnet_050", fold) / layout.checkpoint_name("best")
        model, _ = load_fold_model(path, cache.class_names, torch.device("cpu"))
        model.eval()
        with torch.no_grad():
            logits = model.model(images).numpy()
        mask, gender, age = (torch.softmax(torch.from_numpy(part), 1).numpy()
                             for part in np.split(logits, [3, 5], axis=1))
        composed = np.zeros((len(images), 18))
        for m in range(3):
            for g in range(2):
                for a in range(3):
                    composed[:, 6 * m + 3 * g + a] = mask[:, m] * gender[:, g] * age[:, a]
        expected += composed / composed.sum(1, keepdims=True) / 2
    preds = pd.read_parquet(layout.preds_file(cfg, "lcnet_050")).set_index("id")
    np.testing.assert_allclose(preds[[str(c) for c in range(18)]].to_numpy(), expected, atol=1e-5)
    submission = pd.read_csv(result["file"], dtype=str)
    assert list(submission.columns) == ["ImageID", "ans"] and len(submission) == 5
    assert submission["ans"].tolist() == [str(c) for c in expected.argmax(1)]
