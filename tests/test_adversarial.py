"""Adversarial validation: thumbnails by hand, verdicts by threshold, and a classifier that finds a planted shift."""

import numpy as np
import pytest

from pipeline.analysis.adversarial import adversarial_validation, thumbnail_features, verdict


def test_thumbnail_features_by_hand():
    image = np.array([[0, 255], [255, 255]], dtype=np.uint8)[None, :, :, None]
    # 2x2 cells of one pixel each, then the mean (3/4) and std (sqrt(3)/4) of the image.
    np.testing.assert_allclose(thumbnail_features(image, size=2)[0], [0, 1, 1, 1, 0.75, np.sqrt(3) / 4])


def test_thumbnail_features_average_blocks_and_stream_in_chunks():
    images = np.zeros((3, 4, 4, 1), dtype=np.uint8)
    images[1, :2, :2] = 255  # the top-left quarter bright
    features = thumbnail_features(images, size=2)
    np.testing.assert_allclose(features[1, :4], [1, 0, 0, 0])
    np.testing.assert_allclose(features[[0, 2]], 0)


@pytest.mark.parametrize(("auc", "expected"), [(0.5, "CV trustworthy"), (0.59, "CV trustworthy"),
                                                 (0.6, "mild shift"), (0.74, "mild shift"),
                                                 (0.75, "CV not trustworthy"), (1.0, "CV not trustworthy")])
def test_verdict_thresholds(auc, expected):
    assert verdict(auc)[0] == expected


def noise_images(count, rng, brightness=0):
    return np.clip(rng.normal(100 + brightness, 30, size=(count, 16, 16, 1)), 0, 255).astype(np.uint8)


def test_one_distribution_is_trustworthy():
    rng = np.random.default_rng(0)
    result = adversarial_validation(thumbnail_features(noise_images(200, rng)),
                                    thumbnail_features(noise_images(100, rng)))
    assert abs(result["auc"] - 0.5) < 0.1 and result["verdict"] == "CV trustworthy"
    assert result["test_likeness"].shape == (200,) and result["test_probability"].shape == (100,)


def test_a_shift_is_found_and_the_test_like_training_images_rank_first():
    rng = np.random.default_rng(1)
    train = noise_images(200, rng)
    train[:5] = noise_images(5, rng, brightness=60)  # five training images that look like the test set
    result = adversarial_validation(thumbnail_features(train), thumbnail_features(noise_images(100, rng, 60)))
    assert result["auc"] > 0.9 and result["verdict"] == "CV not trustworthy"
    assert set(np.argsort(-result["test_likeness"])[:5]) == {0, 1, 2, 3, 4}
