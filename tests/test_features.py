"""The features stage: its math by hand, its cross-fitting, and the stage on the smoke competition."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import check_member_tables

from pipeline import ensemble, features, folds, layout, prepare
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.training import embedding


def test_normalise_patches_by_hand():
    # [0, 1]: mean 0.5, std 0.5 -> (-0.5, 0.5) / (0.5 + 0.1)
    np.testing.assert_allclose(features.normalise_patches(np.array([[0.0, 1.0]])), [[-0.5 / 0.6, 0.5 / 0.6]])


def test_zca_matrix_by_hand():
    # rows (+-2, 0) and (0, +-1): covariance diag(8/3, 2/3) (n - 1 = 3),
    # so W = diag(1/sqrt(8/3 + 0.1), 1/sqrt(2/3 + 0.1))
    patches = np.array([[2.0, 0], [-2, 0], [0, 1], [0, -1]])
    np.testing.assert_allclose(features.zca_matrix(patches), np.diag([(8 / 3 + 0.1) ** -0.5, (2 / 3 + 0.1) ** -0.5]),
                               atol=1e-12)


def test_encode_by_hand():
    """A 3x3 image with a bright middle column, one 2x2 filter (left minus right): windows (0,1) and (1,1) read
    [[1,0],[1,0]]: mean 0.5, std 0.5, response 2 / 0.6, minus threshold 0.5 -> 2.8333; windows (0,0) and (1,0) read
    the mirror image and respond negatively -> 0. Adaptive pooling of the 2x2 map to 3x3 averages columns {0}, {0, 1},
    {1} -> 0, 1.4167, 2.8333 in every row; its 2x2 maxima are the map itself."""
    image = np.array([[0, 255, 0]] * 3, dtype=np.uint8)[None, :, :, None]
    active = 2 / 0.6 - 0.5
    expected = [0, active / 2, active] * 3 + [0, active, 0, active]
    left_minus_right = torch.tensor([[[[1.0, -1.0], [1.0, -1.0]]]])
    np.testing.assert_allclose(features.encode(image, left_minus_right, 1, 0.5), [expected], rtol=1e-5)
    # the response reads the patch minus its mean: a filter's own mean changes nothing
    np.testing.assert_allclose(features.encode(image, left_minus_right + 1.0, 1, 0.5), [expected], rtol=1e-5)
    # stride 2 reads window (0,0) alone: a negative response, every feature 0
    np.testing.assert_allclose(features.encode(image, left_minus_right, 2, 0.5), [[0.0] * 13], atol=1e-6)


def test_learned_filters_have_the_images_channels_and_shape():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(10, 12, 12, 3), dtype=np.uint8)
    filters = features.learn_filters(images, clusters=4, patch=3, count=200, seed=0)
    assert filters.shape == (4, 3, 3, 3)
    assert features.encode(images, filters, 1, 0.5).shape == (10, 4 * 13)


def test_a_backbone_named_like_the_member_is_refused():
    with pytest.raises(ConfigError, match="features"):
        load_config(None, ["backbones=[features]"])
    assert "features" in load_config(None, ["backbones=[features]", "features.enabled=false"]).backbones


@pytest.fixture
def smoke_work(smoke_config):
    cfg = smoke_config()
    prepare.main(cfg)
    folds.main(cfg)
    return cfg


def test_the_stage_writes_a_member_the_ensemble_reads(smoke_work, smoke_config):
    cfg = smoke_work
    result = features.main(cfg)
    check_member_tables(cfg, layout.features_dir(cfg))
    recorded = json.loads(layout.features_metrics_file(cfg).read_text())
    assert recorded["features_enabled"] == 1 and recorded["features_cv"] == pytest.approx(result["cv"])
    # The ensemble takes it as a member beside the backbones; with the backbones' files absent it names theirs.
    with pytest.raises(Exception, match="lcnet_050"):
        ensemble.load_members(cfg, ensemble.Cache.open(cfg))
    assert list(ensemble.member_files(cfg))[-2] == "features"
    assert "features" not in ensemble.member_files(smoke_config("features.enabled=false"))
    # What the kernel predicts with, without scikit-learn: each fold's saved filters and regression give the test
    # probabilities the stage wrote.
    meta, regressions = embedding.load_regressions(layout.features_dir(cfg) / layout.FEATURES_REGRESSIONS)
    assert len(regressions) == 2 and regressions[0]["filters0"].shape == (16, 1, 6, 6)
    assert meta["settings"]["clusters"] == 16 and meta["size_hw"] == [32, 32]
    cache = ensemble.Cache.open(cfg)
    kernel = embedding.features_member_proba(regressions, meta["settings"], cache.images("test"), 4)
    test = pd.read_parquet(layout.features_dir(cfg) / layout.FEATURES_TEST).set_index("id")
    np.testing.assert_allclose(kernel, test.loc[cache.table("test")["id"].astype(str), meta["class_names"]],
                               rtol=0, atol=1e-6)


def test_the_stage_is_repeatable_and_disabling_it_leaves_a_note(smoke_work, smoke_config):
    cfg = smoke_work
    features.main(cfg)
    first = pd.read_parquet(layout.features_dir(cfg) / layout.FEATURES_OOF)
    features.main(cfg)
    pd.testing.assert_frame_equal(first, pd.read_parquet(layout.features_dir(cfg) / layout.FEATURES_OOF))
    disabled = smoke_config("features.enabled=false")
    assert features.main(disabled) == {"enabled": False}
    assert [p.name for p in layout.features_dir(cfg).iterdir()] == [layout.FEATURES_NOTE]
    assert json.loads(layout.features_metrics_file(cfg).read_text()) == {"features_enabled": 0}


def test_a_patch_larger_than_the_images_is_a_config_error(smoke_work, smoke_config):
    with pytest.raises(ConfigError, match="features.patch=40"):
        features.main(smoke_config("features.patch=[6,40]", "features.stride=[1,2]"))


def test_each_dictionary_adds_its_features_beside_the_others(smoke_work, smoke_config, capsys):
    """13 pooled numbers per filter and dictionary: 16 filters give 208 an image with one dictionary, 416 with two,
    and the regression reads them all."""
    features.main(smoke_work)
    assert "208 features an image" in capsys.readouterr().err
    two = features.main(smoke_config("features.patch=[6,10]", "features.stride=[1,2]"))
    err = capsys.readouterr().err
    assert "filters of 6x6" in err and "filters of 10x10" in err and "416 features an image" in err
    assert two["cv"] > 0
    for table in (layout.FEATURES_OOF, layout.FEATURES_TEST):  # float32 features: rows renormalised to sum 1
        proba = pd.read_parquet(layout.features_dir(smoke_work) / table).drop(columns=["id", "fold"], errors="ignore")
        np.testing.assert_allclose(proba.sum(1), 1.0)


def test_patch_and_stride_pair_up_one_dictionary_each():
    cfg = load_config(None, ["features.patch=8", "features.stride=4"])
    assert (cfg.features.patch, cfg.features.stride) == ([8], [4])
    with pytest.raises(ConfigError, match=r"features.patch \[6, 8, 10\] and features.stride \[1\]"):
        load_config(None, ["features.patch=[6,8,10]"])


def test_each_fold_learns_its_dictionary_from_its_training_images_only(smoke_work, monkeypatch):
    """The whitening and the k-means dictionary see a fold's training images, never its held-out images nor the
    test images: each call of learn_filters gets exactly one fold's training rows, and every fold gets one call."""
    cfg = smoke_work
    seen = []
    learn = features.learn_filters
    monkeypatch.setattr(features, "learn_filters", lambda images, *args: seen.append(np.array(images)) or learn(
        images, *args))
    features.main(cfg)
    cache = ensemble.Cache.open(cfg)
    train_images, test_images = np.asarray(cache.images("train")), np.asarray(cache.images("test"))
    ids = cache.table("train")["id"].astype(str).tolist()
    fold_of = pd.read_csv(layout.folds_file(cfg), dtype=str).set_index("id")["fold"]
    image_of = {image.tobytes(): i for i, image in enumerate(train_images)}
    assert len(seen) == fold_of.nunique()
    for images, fold in zip(seen, sorted(fold_of.unique())):
        rows = sorted(image_of[image.tobytes()] for image in images)
        assert rows == [r for r, i in enumerate(ids) if fold_of[i] != fold]
        assert not {image.tobytes() for image in images} & {image.tobytes() for image in test_images}
