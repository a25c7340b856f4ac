"""Stage embed: a frozen ImageNet-pretrained backbone's pooled features and a logistic regression per fold.

Reads:  ``paths.cache`` (the images at ``embed.image_size``, which prepare caches beside ``data.image_size``),
        ``paths.folds``.
Writes: ``paths.embed``/oof.parquet (every training image's probabilities from the model of the fold that held it
        out), ``paths.embed``/test.parquet (the folds' models averaged), ``paths.embed``/regressions.npz (each fold's
        standardisation and regression, the backbones, image size and normalisation: what the code-competition
        kernel predicts with, ``training/embedding.py``) and ``paths.metrics``/embed.json (CV mean and spread, OOF
        figures); with ``embed.enabled=false``, only a note and ``{"embed_enabled": 0}``.

Each backbone of ``embed.backbones`` (a packaged ImageNet weight such as ``efficientnet_lite0``, which loads offline,
a ``timm_model=path`` weights file, or a timm name whose weights come from the hub) reads every image once (twice
in each view of ``embed.tta``: by default the image, its mirror image, upside down and both, their features averaged),
in eval mode, with the normalisation its
weights expect; its last feature map, and the outputs of its last ``embed.stages`` feature stages (mid-level
features, which fit these images better than ImageNet's classes do), are pooled by mean and by max.
scikit-learn's logistic regression, one per fold, reads every backbone's pooled features side by side. Nothing is
learned from the images but the regression, whose labels are the fold's training rows only: the OOF is a true
cross-validation. On two CPU cores EfficientNet-Lite0 at
224 px takes about three and a half minutes for 2,624 images in four views, where fine-tuning it takes many.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from pipeline import cli, layout
from pipeline.artifacts import atomic_dir
from pipeline.config import Config
from pipeline.data.images import Cache
from pipeline.training import embedding, linear
from pipeline.training.views import tta_transforms


def main(cfg: Config) -> dict:
    settings = cfg.embed
    with atomic_dir(layout.embed_dir(cfg)) as out:
        if not settings.enabled:
            return linear.write_disabled(out, layout.EMBED_MEMBER, layout.embed_metrics_file(cfg))
        started = time.perf_counter()
        sources = [embedding.backbone_source(name) for name in settings.backbones]  # every name checked first
        tta_transforms(settings.tta, (settings.image_size, settings.image_size), embedding.TTA_KEY)  # and the views
        cache = Cache.open(cfg)
        ids, labels, folds, rows = linear.training_rows(cfg, cache)
        size = (settings.image_size, settings.image_size)
        train_images, test_images = cache.images("train", size), cache.images("test", size)
        x_train, x_test, read = [], [], []
        for name, (model_name, path) in zip(settings.backbones, sources):
            model, mean, std = embedding.backbone_model(model_name, path, cfg.data.channels)
            embedding.check_stages(model, model_name, settings.stages)
            read.append({"name": name, "timm_model": model_name, "mean": mean, "std": std})
            x_train.append(embedding.embed_images(model, train_images, mean, std, settings.tta, settings.batch_size,
                                                  f"embed {name} train", stages=settings.stages)[rows])
            x_test.append(embedding.embed_images(model, test_images, mean, std, settings.tta, settings.batch_size,
                                                 f"embed {name} test", stages=settings.stages))
            print(f"embed: {name} read {len(train_images) + len(test_images)} images at {settings.image_size} px "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        x_train, x_test = np.concatenate(x_train, 1), np.concatenate(x_test, 1)
        oof, test, fold_rows, fitted = linear.cross_fit_logistic(x_train, labels, folds, x_test,
                                                                 len(cache.class_names),
                                                                 settings.inverse_regularisation,
                                                                 settings.balance_power)
        embedding.save_regressions(out / layout.EMBED_REGRESSIONS, fitted, {
            "backbones": read, "image_size": settings.image_size, "tta": settings.tta, "stages": settings.stages,
            "channels": cfg.data.channels, "class_names": cache.class_names, "features": int(x_train.shape[1])})
        result = linear.write_member(out, layout.EMBED_MEMBER, layout.embed_metrics_file(cfg), cfg.metric, cache, ids,
                                     labels, folds, oof, test, fold_rows)
    print(f"embed: {x_train.shape[1]} features an image; CV {cfg.metric} {result['cv']:.4f} ± "
          f"{result['cv_std']:.4f}, OOF accuracy {result['oof']['accuracy']:.4f} "
          f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return {"enabled": True, "cv": result["cv"], "cv_std": result["cv_std"]}


if __name__ == "__main__":
    cli.run(main, "Read the images with a frozen pretrained backbone and fit a logistic regression per fold: "
                  "an ensemble member.")
