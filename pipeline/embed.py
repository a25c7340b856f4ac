"""Stage embed: a frozen ImageNet-pretrained backbone's pooled features and a logistic regression per fold.

Reads:  ``paths.cache`` (the images at ``embed.image_size``, which prepare caches beside ``data.image_size``),
        ``paths.folds``.
Writes: ``paths.embed``/oof.parquet (every training image's probabilities from the model of the fold that held it
        out), ``paths.embed``/test.parquet (the folds' models averaged) and ``paths.metrics``/embed.json (CV mean and
        spread, OOF figures); with ``embed.enabled=false``, only a note and ``{"embed_enabled": 0}``.

Each backbone of ``embed.backbones`` (a packaged ImageNet weight such as ``efficientnet_lite0``, which loads offline,
a ``timm_model=path`` weights file, or a timm name whose weights come from the hub) reads every image once (twice
with ``embed.flip``: the image and its mirror, their features averaged), in eval mode, with the normalisation its
weights expect; its last feature map is pooled by mean and by max. scikit-learn's logistic regression, one per fold,
reads every backbone's pooled features side by side. Nothing is learned from the images but the regression, whose
labels are the fold's training rows only: the OOF is a true cross-validation. On two CPU cores EfficientNet-Lite0 at
224 px takes about two minutes for 2,624 images and two views, where fine-tuning it takes many.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline import cli, layout
from pipeline.artifacts import atomic_dir
from pipeline.config import Config
from pipeline.data.images import Cache
from pipeline.errors import ConfigError
from pipeline.training import linear, weights


def backbone_source(name: str):
    """(timm model name, weights file or None for the hub) of an entry of ``embed.backbones``: a packaged weight,
    ``timm_model=path``, or a timm name; an entry that names neither is a ConfigError."""
    import timm

    if weights.packaged_key(name):
        model_name, path = weights.PACKAGED[weights.packaged_key(name)].timm_model, weights.resolve_weights(name)
    elif "=" in name:
        model_name, file = name.split("=", 1)
        path = weights.resolve_weights(file)
    else:
        model_name, path = name, None
    if not timm.is_model(model_name):
        raise ConfigError(f"embed.backbones: {model_name!r} is not a timm model nor a packaged weight "
                          f"({', '.join(weights.PACKAGED)})")
    return model_name, path


def frozen_backbone(name: str, in_chans: int) -> tuple[nn.Module, list[float], list[float]]:
    """(the timm model without its classifier, in eval mode, the mean and std its weights expect) for an entry of
    ``embed.backbones``: a packaged weight, ``timm_model=path``, or a timm name (pretrained from the hub)."""
    import timm

    model_name, path = backbone_source(name)
    if path is None:
        with weights.hub_weights(model_name):
            model = timm.create_model(model_name, pretrained=True, num_classes=0, in_chans=in_chans)
    else:
        model = timm.create_model(model_name, pretrained=False, num_classes=0, in_chans=in_chans)
        weights.load_weights(model, path)
    mean, std = weights.input_normalisation(timm.data.resolve_data_config({}, model=model), in_chans)
    return model.eval(), mean, std


def pooled(feature_map: torch.Tensor) -> torch.Tensor:
    """N x C x H x W -> N x 2C: each channel's mean, then each channel's maximum."""
    return torch.cat([feature_map.mean((2, 3)), feature_map.amax((2, 3))], 1)


def embed_images(model: nn.Module, images: np.ndarray, mean, std, flip: bool, batch_size: int,
                 desc: str) -> np.ndarray:
    """N x H x W x C uint8 images -> N x 2C float32 pooled features (with ``flip``: the mean of the image's and its
    mirror image's)."""
    mean = torch.tensor(mean).view(1, -1, 1, 1) * 255.0
    std = torch.tensor(std).view(1, -1, 1, 1) * 255.0
    out = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", file=sys.stderr,
                          mininterval=5.0, disable=None):
            batch = torch.from_numpy(np.array(images[start:start + batch_size])).permute(0, 3, 1, 2)
            batch = (batch.float() - mean) / std
            features = pooled(model.forward_features(batch))
            if flip:
                features = (features + pooled(model.forward_features(batch.flip(3)))) / 2
            out.append(features.numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def main(cfg: Config) -> dict:
    settings = cfg.embed
    with atomic_dir(layout.embed_dir(cfg)) as out:
        if not settings.enabled:
            return linear.write_disabled(out, layout.EMBED_MEMBER, layout.embed_metrics_file(cfg))
        started = time.perf_counter()
        for name in settings.backbones:  # every name checked before any work
            backbone_source(name)
        cache = Cache.open(cfg)
        ids, labels, folds, rows = linear.training_rows(cfg, cache)
        size = (settings.image_size, settings.image_size)
        train_images, test_images = cache.images("train", size), cache.images("test", size)
        x_train, x_test = [], []
        for name in settings.backbones:
            model, mean, std = frozen_backbone(name, cfg.data.channels)
            x_train.append(embed_images(model, train_images, mean, std, settings.flip, settings.batch_size,
                                        f"embed {name} train")[rows])
            x_test.append(embed_images(model, test_images, mean, std, settings.flip, settings.batch_size,
                                       f"embed {name} test"))
            print(f"embed: {name} read {len(train_images) + len(test_images)} images at {settings.image_size} px "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        x_train, x_test = np.concatenate(x_train, 1), np.concatenate(x_test, 1)
        oof, test, fold_rows = linear.cross_fit_logistic(x_train, labels, folds, x_test, len(cache.class_names),
                                                settings.inverse_regularisation, settings.balance_power)
        result = linear.write_member(out, layout.EMBED_MEMBER, layout.embed_metrics_file(cfg), cfg.metric, cache, ids,
                                     labels, folds, oof, test, fold_rows)
    print(f"embed: {x_train.shape[1]} features an image; CV {cfg.metric} {result['cv']:.4f} ± "
          f"{result['cv_std']:.4f}, OOF accuracy {result['oof']['accuracy']:.4f} "
          f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return {"enabled": True, "cv": result["cv"], "cv_std": result["cv_std"]}


if __name__ == "__main__":
    cli.run(main, "Read the images with a frozen pretrained backbone and fit a logistic regression per fold: "
                  "an ensemble member.")
