"""Stage features: a second kind of ensemble member, learned patch features and a linear model, no network.

Reads:  ``paths.cache`` (the images and their labels), ``paths.folds``.
Writes: ``paths.features``/oof.parquet (every training image's probabilities from the model of the fold that held
        it out), ``paths.features``/test.parquet (the test images', the folds' models averaged) and
        ``paths.metrics``/features.json (CV mean and spread, OOF figures); with ``features.enabled=false``, only a
        note in the folder and ``{"features_enabled": 0}``, and the ensemble leaves the member out.

The single-layer network of Coates, Lee and Ng (An Analysis of Single-Layer Networks in Unsupervised Feature
Learning, AISTATS 2011): k-means learns ``features.clusters`` filters from contrast-normalised, ZCA-whitened
``features.patch``-pixel patches (one dictionary per entry of the list); every image is convolved with them (every
``features.stride`` pixels), thresholded (``max(0, response - features.threshold)``) and pooled (means over a 3 x 3
grid, maxima over 2 x 2); scikit-learn's logistic regression, one per fold, reads every dictionary's pooled
features. On a CPU it takes a minute or two where a backbone takes many, and its errors differ from a network's,
which is what an ensemble needs. The filters learn from the training images' pixels without their labels; the labels
reach only the per-fold regression, so the OOF is a true cross-validation.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from joblib import Parallel, cpu_count, delayed
from sklearn.cluster import MiniBatchKMeans
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from pipeline import cli, layout, metrics
from pipeline.artifacts import atomic_dir, probability_table, write_json, write_parquet
from pipeline.competition import encode_labels
from pipeline.config import Config
from pipeline.errors import ConfigError, DataError
from pipeline.images import Cache
from pipeline.tables import read_folds
from pipeline.voting import normalise_rows

CONTRAST_EPS = 0.1  # added to a patch's standard deviation (pixels in [0, 1]): flat patches stay near zero
ZCA_EPS = 0.1  # added to the patch covariance's eigenvalues before whitening: noise is not amplified without end
POOL_MEAN_GRID, POOL_MAX_GRID = 3, 2
BATCH = 64  # images encoded at a time


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


def encode(images: np.ndarray, filters: torch.Tensor, stride: int, threshold: float) -> np.ndarray:
    """N x H x W x C uint8 images -> N x (K * (3*3 + 2*2)) features: each filter's response to every contrast-
    normalised patch, ``max(0, response - threshold)``, then means over a 3 x 3 grid and maxima over 2 x 2."""
    clusters, channels, patch, _ = filters.shape
    box = torch.ones(1, channels, patch, patch) / (channels * patch * patch)
    centred = filters - filters.mean((1, 2, 3), keepdim=True)
    out = []
    with torch.no_grad():
        for start in range(0, len(images), BATCH):
            batch = torch.from_numpy(np.array(images[start:start + BATCH])).permute(0, 3, 1, 2).float()
            batch /= 255.0
            mean = F.conv2d(batch, box, stride=stride)
            std = (F.conv2d(batch ** 2, box, stride=stride) - mean ** 2).clamp_min(0).sqrt()
            # (patch - its mean) . filter = patch . (filter - its mean): one convolution with zero-mean filters. In
            # place: the responses are the largest tensor here, and memory, not arithmetic, sets the pace.
            active = F.conv2d(batch, centred, stride=stride).div_(std + CONTRAST_EPS)
            active.sub_(threshold).relu_()
            out.append(torch.cat([F.adaptive_avg_pool2d(active, POOL_MEAN_GRID).flatten(1),
                                  F.adaptive_max_pool2d(active, POOL_MAX_GRID).flatten(1)], 1).numpy())
    return np.concatenate(out) if out else np.zeros((0, clusters * (POOL_MEAN_GRID ** 2 + POOL_MAX_GRID ** 2)))


def class_weights(labels: np.ndarray, n_classes: int, power: float) -> dict[int, float]:
    """Weight count**-power per class present, scaled so that the mean weight over ``labels`` is 1."""
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = counts[present] ** -power
    weights /= weights[labels].mean()
    return {int(c): float(weights[c]) for c in np.flatnonzero(present)}


def fit_predict(x_train, y_train, x_predict: list[np.ndarray], n_classes: int, inverse_regularisation: float,
                balance_power: float) -> list[np.ndarray]:
    """Standardise on the training rows, fit a class-weighted logistic regression, predict every array of
    ``x_predict``; a class absent from the training rows keeps probability 0."""
    scaler = StandardScaler().fit(x_train)
    model = LogisticRegression(C=inverse_regularisation, max_iter=3000,
                               class_weight=class_weights(y_train, n_classes, balance_power))
    model.fit(scaler.transform(x_train), y_train)
    predictions = []
    for x in x_predict:
        proba = np.zeros((len(x), n_classes))
        proba[:, model.classes_] = model.predict_proba(scaler.transform(x))
        predictions.append(normalise_rows(proba))  # float32 features give float32 sums: 1 +- 1e-7
    return predictions


def cross_fit(x, labels, folds, x_test, n_classes: int, inverse_regularisation: float, balance_power: float):
    """(OOF probabilities: each row from the model fit on the other folds, test probabilities: the folds' models
    averaged, each fold's validation rows)."""
    oof = np.zeros((len(labels), n_classes))
    test = np.zeros((len(x_test), n_classes))
    fold_names = np.unique(folds)
    valid_rows = [folds == fold for fold in fold_names]
    # One BLAS thread a fit and the folds side by side: these small fits run 2.7 times slower on two BLAS threads than
    # on one (4.5 s against 12 s a fold on 2 cores), and the result does not depend on how many run at once.
    with threadpool_limits(1):
        fitted = Parallel(n_jobs=min(len(fold_names), cpu_count()), prefer="threads")(
            delayed(fit_predict)(x[~valid], labels[~valid], [x[valid], x_test], n_classes, inverse_regularisation,
                                 balance_power) for valid in valid_rows)
    for valid, (fold_oof, fold_test) in zip(valid_rows, fitted):
        oof[valid] = fold_oof
        test += fold_test / len(fold_names)
    return oof, test, [(int(fold), np.flatnonzero(valid)) for fold, valid in zip(fold_names, valid_rows)]


def report(cfg: Config, labels, oof, fold_rows, class_names) -> dict:
    """The member's CV (mean ± std over folds, as train reports a backbone's), OOF figures and per-fold scores."""
    per_fold = [{"fold": fold, cfg.metric: metrics.score(cfg.metric, labels[rows], oof[rows])}
                for fold, rows in fold_rows]
    scores = np.array([f[cfg.metric] for f in per_fold])
    oof_summary = metrics.summary(labels, oof, class_names) | {cfg.metric: metrics.score(cfg.metric, labels, oof)}
    return {"cv": float(scores.mean()), "cv_std": float(scores.std()), "oof": oof_summary, "folds": per_fold}


def record(result: dict, metric: str) -> dict:
    """The flat metrics file, every key prefixed ``features_`` (as train's are by the backbone)."""
    flat = {"enabled": 1, "cv": result["cv"], "cv_std": result["cv_std"],
            **{f"oof_{name}": result["oof"][name] for name in dict.fromkeys(("accuracy", "macro_f1", metric))},
            **{f"oof_f1_{name}": value for name, value in result["oof"]["per_class_f1"].items()},
            **{f"fold{f['fold']}_{metric}": f[metric] for f in result["folds"]}}
    return {f"{layout.FEATURES_MEMBER}_{key}": float(value) for key, value in flat.items()}


def training_rows(cfg: Config, cache: Cache):
    """(ids, integer labels, folds, cache row of each) of the training images folds.csv assigns, in its order."""
    folds = read_folds(cfg)
    table = cache.table("train")
    row_of = {str(i): r for r, i in enumerate(table["id"].astype(str))}
    missing = [i for i in folds["id"] if i not in row_of]
    if missing:
        raise DataError(f"{layout.folds_file(cfg)} names {len(missing)} id(s) the image cache does not hold "
                        f"({', '.join(missing[:5])}): re-run prepare and folds")
    labels = encode_labels(folds["label"], cache.class_names, str(layout.folds_file(cfg)))
    return folds["id"].to_numpy(), labels, folds["fold"].to_numpy(), np.array([row_of[i] for i in folds["id"]])


def main(cfg: Config) -> dict:
    settings = cfg.features
    with atomic_dir(layout.features_dir(cfg)) as out:
        if not settings.enabled:
            (out / layout.FEATURES_NOTE).write_text("features.enabled is false: the ensemble has no features member\n")
            write_json(layout.features_metrics_file(cfg), {f"{layout.FEATURES_MEMBER}_enabled": 0})
            print("features: disabled (features.enabled=false)", file=sys.stderr)
            return {"enabled": False}
        started = time.perf_counter()
        cache = Cache.open(cfg)
        ids, labels, folds, rows = training_rows(cfg, cache)
        train_images, test_images = cache.images("train"), cache.images("test")  # memory-mapped, read in batches
        if min(train_images.shape[1:3]) < max(settings.patch):
            raise ConfigError(f"features.patch={max(settings.patch)} is larger than the cached images "
                              f"({train_images.shape[1]}x{train_images.shape[2]}): lower it")
        x_train, x_test = [], []
        for patch, stride in zip(settings.patch, settings.stride):  # one dictionary each, their features side by side
            filters = learn_filters(train_images, settings.clusters, patch, settings.patches, settings.seed)
            print(f"features: {settings.clusters} filters of {patch}x{patch} learned "
                  f"({time.perf_counter() - started:.0f} s); encoding {len(ids)} + {len(test_images)} images every "
                  f"{stride} pixel(s)", file=sys.stderr)
            x_train.append(encode(train_images, filters, stride, settings.threshold)[rows])
            x_test.append(encode(test_images, filters, stride, settings.threshold))
        x_train, x_test = np.concatenate(x_train, 1), np.concatenate(x_test, 1)
        oof, test, fold_rows = cross_fit(x_train, labels, folds, x_test, len(cache.class_names),
                                         settings.inverse_regularisation, settings.balance_power)
        result = report(cfg, labels, oof, fold_rows, cache.class_names)
        write_parquet(out / layout.FEATURES_OOF, probability_table(ids, oof, cache.class_names, folds))
        write_parquet(out / layout.FEATURES_TEST,
                      probability_table(cache.table("test")["id"].astype(str), test, cache.class_names))
        write_json(layout.features_metrics_file(cfg), record(result, cfg.metric))
    print(f"features: {x_train.shape[1]} features an image; CV {cfg.metric} {result['cv']:.4f} ± "
          f"{result['cv_std']:.4f}, OOF accuracy {result['oof']['accuracy']:.4f} "
          f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return {"enabled": True, "cv": result["cv"], "cv_std": result["cv_std"]}


if __name__ == "__main__":
    cli.run(main, "Learn k-means patch features and fit a logistic regression per fold: an ensemble member.")
