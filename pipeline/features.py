"""Stage features: a second kind of ensemble member, learned patch features and a linear model, no network.

Reads:  ``paths.cache`` (the images and their labels), ``paths.folds``.
Writes: ``paths.features``/oof.parquet (every training image's probabilities from the model of the fold that held
        it out), ``paths.features``/test.parquet (the test images', the folds' models averaged),
        ``paths.features``/regressions.npz (each fold's filters and regression, the settings: what the code-competition
        kernel predicts with, ``training/embedding.py``) and ``paths.metrics``/features.json (CV mean and spread,
        OOF figures); with ``features.enabled=false``, only a note in the folder and ``{"features_enabled": 0}``, and
        the ensemble leaves the member out.

The single-layer network of Coates, Lee and Ng (An Analysis of Single-Layer Networks in Unsupervised Feature
Learning, AISTATS 2011): k-means learns ``features.clusters`` filters from contrast-normalised, ZCA-whitened
``features.patch``-pixel patches (one dictionary per entry of the list); every image is convolved with them (every
``features.stride`` pixels), thresholded (``max(0, response - features.threshold)``) and pooled (means over a 3 x 3
grid, maxima over 2 x 2); scikit-learn's logistic regression, one per fold, reads every dictionary's pooled
features. On a CPU it takes a minute or two where a backbone takes many, and its errors differ from a network's,
which is what an ensemble needs. Each fold learns its own whitening and dictionary from its training images alone
(never its held-out images or the test images), so the OOF is a true cross-validation; the test images' probabilities
are the folds' models averaged, each with its own dictionary.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from sklearn.cluster import MiniBatchKMeans

from pipeline import cli, layout
from pipeline.artifacts import atomic_dir
from pipeline.config import Config
from pipeline.data.images import Cache
from pipeline.errors import ConfigError
from pipeline.training import embedding, linear
from pipeline.training.embedding import CONTRAST_EPS, POOL_MAX_GRID, POOL_MEAN_GRID, encode

ZCA_EPS = 0.1  # added to the patch covariance's eigenvalues before whitening: noise is not amplified without end


def normalise_patches(patches: np.ndarray) -> np.ndarray:
    """Each row (a flattened patch, pixels in [0, 1]) minus its mean, over its standard deviation + CONTRAST_EPS."""
    return (patches - patches.mean(1, keepdims=True)) / (patches.std(1, keepdims=True) + CONTRAST_EPS)


def zca_matrix(patches: np.ndarray) -> np.ndarray:
    """The symmetric ZCA whitening matrix of rows ``patches``: V diag(1/sqrt(eigenvalue + ZCA_EPS)) V^T."""
    eigenvalues, vectors = np.linalg.eigh(np.cov(patches, rowvar=False))
    return (vectors / np.sqrt(eigenvalues + ZCA_EPS)) @ vectors.T


def sample_patches(images: np.ndarray, patch: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` random patch x patch windows of N x H x W x C uint8 images -> count x (C * patch * patch) in [0, 1],
    channel-major like a convolution's weights."""
    n, height, width, _ = images.shape
    which, rows, cols = (rng.integers(0, limit, count) for limit in (n, height - patch + 1, width - patch + 1))
    windows = np.stack([images[i, r:r + patch, c:c + patch] for i, r, c in zip(which, rows, cols)])
    return windows.transpose(0, 3, 1, 2).reshape(count, -1).astype(np.float64) / 255.0


def learn_filters(images: np.ndarray, clusters: int, patch: int, count: int, seed: int) -> torch.Tensor:
    """K x C x patch x patch filters whose response to a raw patch is its whitened, normalised form's projection on
    one of the k-means centroids (each centroid of unit length, the whitening folded into the filter)."""
    rng = np.random.default_rng(seed)
    normalised = normalise_patches(sample_patches(images, patch, count, rng))
    whiten = zca_matrix(normalised)
    kmeans = MiniBatchKMeans(clusters, random_state=seed, n_init=3, batch_size=4096).fit(normalised @ whiten)
    centroids = kmeans.cluster_centers_ / (np.linalg.norm(kmeans.cluster_centers_, axis=1, keepdims=True) + 1e-12)
    return torch.from_numpy((whiten @ centroids.T).T.astype(np.float32)).reshape(clusters, images.shape[3], patch,
                                                                                     patch)


def fold_features(settings, train_images: np.ndarray, test_images: np.ndarray, rows: np.ndarray, seed: int,
                  learned: list | None = None):
    """``fold_features(valid)`` for :func:`linear.cross_fit_folds`: each dictionary learned from the fold's training
    images alone (``rows[~valid]``: never its held-out images, never the test images), then every image encoded
    with it; the dictionaries' features side by side. Each call appends the fold's filters (``{"filters<j>": K x C
    x patch x patch}``, one per ``features.patch``) to ``learned``."""
    def features_of(valid: np.ndarray):
        fitted = np.sort(rows[~valid])  # sorted: the memory map reads forward
        x_train, x_test = [], []
        if learned is not None:
            learned.append({})
        for index, (patch, stride) in enumerate(zip(settings.patch, settings.stride)):
            filters = learn_filters(train_images[fitted], settings.clusters, patch, settings.patches, seed)
            if learned is not None:
                learned[-1][f"filters{index}"] = filters.numpy()
            x_train.append(encode(train_images, filters, stride, settings.threshold)[rows])
            x_test.append(encode(test_images, filters, stride, settings.threshold))
        dictionaries = ", ".join(f"{settings.clusters} filters of {patch}x{patch}" for patch in settings.patch)
        print(f"features: a fold's {dictionaries} learned from its {len(fitted)} training images; "
              f"{len(rows)} + {len(test_images)} images encoded", file=sys.stderr)
        return np.concatenate(x_train, 1), np.concatenate(x_test, 1)

    return features_of


def main(cfg: Config) -> dict:
    settings = cfg.features
    with atomic_dir(layout.features_dir(cfg)) as out:
        if not settings.enabled:
            return linear.write_disabled(out, layout.FEATURES_MEMBER, layout.features_metrics_file(cfg))
        started = time.perf_counter()
        cache = Cache.open(cfg)
        ids, labels, folds, rows = linear.training_rows(cfg, cache)
        train_images, test_images = cache.images("train"), cache.images("test")  # memory-mapped, read in batches
        if min(train_images.shape[1:3]) < max(settings.patch):
            raise ConfigError(f"features.patch={max(settings.patch)} is larger than the cached images "
                              f"({train_images.shape[1]}x{train_images.shape[2]}): lower it")
        learned = []
        oof, test, fold_rows, fitted = linear.cross_fit_folds(
            fold_features(settings, train_images, test_images, rows, settings.seed, learned), labels, folds,
            len(cache.class_names), settings.inverse_regularisation, settings.balance_power)
        embedding.save_regressions(out / layout.FEATURES_REGRESSIONS, [
            {**regression, **filters} for regression, filters in zip(fitted, learned, strict=True)], {
            "settings": settings.model_dump(exclude={"enabled"}), "channels": cfg.data.channels,
            "size_hw": list(cfg.data.size_hw), "class_names": cache.class_names})
        result = linear.write_member(out, layout.FEATURES_MEMBER, layout.features_metrics_file(cfg), cfg.metric,
                                     cache, ids, labels, folds, oof, test, fold_rows)
    per_image = settings.clusters * len(settings.patch) * (POOL_MEAN_GRID ** 2 + POOL_MAX_GRID ** 2)
    print(f"features: {per_image} features an image; CV {cfg.metric} "
          f"{result['cv']:.4f} ± {result['cv_std']:.4f}, OOF accuracy {result['oof']['accuracy']:.4f} "
          f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return {"enabled": True, "cv": result["cv"], "cv_std": result["cv_std"]}


if __name__ == "__main__":
    cli.run(main, "Learn k-means patch features and fit a logistic regression per fold: an ensemble member.")
