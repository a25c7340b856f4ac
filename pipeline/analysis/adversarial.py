"""Adversarial validation: can a classifier tell the training images from the test images?

If it cannot (ROC AUC near 0.5), train and test come from one distribution and the CV score
should predict the leaderboard; if it can, the CV may mislead, and the training images it
finds most test-like are the ones to validate on. The classifier is a cross-validated
logistic regression on small thumbnails (block means) with per-image brightness and
contrast: cheap, and it sees the shifts that matter most for images from another camera,
lighting or crop. A shift only a deep model could see stays hidden; the verdict says so.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.analysis.statistics import CHUNK_BYTES, grid_sums

THUMBNAIL = 16  # cells per side of the thumbnail features
# (upper ROC AUC, verdict, advice): the first row whose bound the AUC stays below.
VERDICTS = (
    (0.6, "CV trustworthy", "a classifier cannot tell train from test, so the CV score should predict the "
                            "leaderboard"),
    (0.75, "mild shift", "train and test differ a little: compare CV with the public leaderboard early, and "
                         "check the most test-like training images below"),
    (1.01, "CV not trustworthy", "train and test differ clearly: the CV score may mislead; validate on the most "
                                 "test-like training images or remove the shift (crop, colour, size) first"),
)


def thumbnail_features(images, size: int = THUMBNAIL) -> np.ndarray:
    """N x (size*size*C + 2C) features of an N x H x W x C uint8 array, read in chunks: block means, then each
    channel's mean and standard deviation over the image, all in [0, 1]."""
    count, channels = len(images), images.shape[-1]
    step = max(1, CHUNK_BYTES // max(int(np.prod(images.shape[1:])), 1))
    features = np.zeros((count, size * size * channels + 2 * channels))
    for start in range(0, count, step):
        chunk = np.asarray(images[start:start + step], dtype=np.uint8)
        cells, areas = grid_sums(chunk, size, size)
        means = cells / areas[None, :, :, None] / 255.0
        pixels = chunk.reshape(len(chunk), -1, channels) / 255.0
        features[start:start + len(chunk)] = np.concatenate(
            [means.reshape(len(chunk), -1), pixels.mean(axis=1), pixels.std(axis=1)], axis=1)
    return features


def verdict(auc: float) -> tuple[str, str]:
    """(verdict, advice) for a train-vs-test ROC AUC."""
    for bound, name, advice in VERDICTS:
        if auc < bound:
            return name, advice
    return VERDICTS[-1][1], VERDICTS[-1][2]


def adversarial_validation(train_features: np.ndarray, test_features: np.ndarray, n_splits: int = 5,
                           seed: int = 0) -> dict:
    """Cross-validated train-vs-test classifier.

    Returns ``auc`` (ROC AUC of the out-of-fold test probabilities, 0.5 = indistinguishable),
    ``fold_aucs``, ``verdict`` and ``advice``, ``test_likeness``: for every training row, the
    out-of-fold probability that it is a test image (high = most test-like), and ``test_probability``,
    the same for every test row.
    """
    features = np.vstack([train_features, test_features])
    is_test = np.r_[np.zeros(len(train_features), dtype=int), np.ones(len(test_features), dtype=int)]
    n_splits = min(n_splits, len(train_features), len(test_features))
    if n_splits < 2:
        raise ValueError("adversarial validation needs at least 2 training and 2 test images")
    probability = np.zeros(len(features))
    fold_aucs = []
    for fit_rows, held in StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(features, is_test):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        model.fit(features[fit_rows], is_test[fit_rows])
        probability[held] = model.predict_proba(features[held])[:, 1]
        fold_aucs.append(float(roc_auc_score(is_test[held], probability[held])))
    auc = float(roc_auc_score(is_test, probability))
    name, advice = verdict(auc)
    return {"auc": auc, "fold_aucs": fold_aucs, "verdict": name, "advice": advice,
            "test_likeness": probability[:len(train_features)], "test_probability": probability[len(train_features):]}
