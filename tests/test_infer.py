"""TTA: no views equals plain inference, flips of a flip-invariant image change nothing, merges stay finite."""

import numpy as np
import pytest
import torch
from conftest import make_config

from pipeline.errors import ConfigError
from pipeline.infer import merge_views, predict_views, tta_transforms, view_names
from pipeline.training.loop import predict_logits
from pipeline.training.models import Heads, ProbabilityModel, create_model


def tiny_model(channels=1):
    torch.manual_seed(0)
    heads = Heads(["a", "b", "c"], [("target", ["a", "b", "c"])])
    model = create_model("resnet10t", heads, channels, [0.5] * channels, [0.25] * channels)
    return ProbabilityModel(model, heads).eval()


@pytest.mark.parametrize("size_hw", [(16, 16), (16, 24)])
def test_no_views_equals_plain_inference(size_hw):
    model = tiny_model()
    images = np.random.default_rng(0).integers(0, 255, (10, *size_hw, 1), dtype=np.uint8)
    views = predict_views(model, images, np.arange(10), tta_transforms([], size_hw), torch.device("cpu"), 4)
    loader = torch.utils.data.DataLoader(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), batch_size=4)
    plain = predict_logits(model, loader, torch.device("cpu")).numpy()
    assert views.shape == (1, 10, 3)
    np.testing.assert_allclose(views[0], plain, atol=1e-6)


@pytest.mark.parametrize("size_hw", [(16, 16), (12, 20)])
def test_flip_views_of_a_flip_invariant_image_equal_plain(size_hw):
    model = tiny_model()
    half = np.random.default_rng(1).integers(0, 255, (6, size_hw[0], size_hw[1] // 2, 1), dtype=np.uint8)
    images = np.concatenate([half, half[:, :, ::-1]], axis=2)  # mirror-symmetric left to right
    compose = tta_transforms(["hflip"], size_hw)
    views = predict_views(model, images, np.arange(6), compose, torch.device("cpu"), 4)
    assert view_names(compose, ["hflip"]) == ["plain", "hflip"]
    np.testing.assert_allclose(views[1], views[0], atol=1e-5)
    np.testing.assert_allclose(merge_views(views, "mean"), views[0], atol=1e-5)


def test_rotations_and_scales_on_rectangles():
    model = tiny_model()
    images = np.random.default_rng(2).integers(0, 255, (3, 12, 20, 1), dtype=np.uint8)
    compose = tta_transforms(["rotate90", "multiscale"], (12, 20))
    names = view_names(compose, ["rotate90", "multiscale"])
    assert len(names) == 2 * 3 and "rotate90=180" in names  # a rectangle gets the half turn only
    views = predict_views(model, images, np.arange(3), compose, torch.device("cpu"), 2)
    assert views.shape == (6, 3, 3) and np.isfinite(views).all()


@pytest.mark.parametrize("mode", ["mean", "gmean"])
def test_merges_are_distributions_even_with_zeros(mode):
    views = np.array([[[1.0, 0.0, 0.0]], [[0.0, 0.5, 0.5]]])
    merged = merge_views(views, mode)
    assert np.isfinite(merged).all()
    np.testing.assert_allclose(merged.sum(1), 1.0)


def test_unknown_tta_transform_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="hflip"):
        tta_transforms(["hflipp"], (8, 8))
    from pipeline import infer

    with pytest.raises(ConfigError, match="rotate90"):
        infer.main(make_config(tmp_path, "infer.tta=[rotate45]"))


def transformed(images: np.ndarray, name: str) -> np.ndarray:
    """N x H x W x C images under a view named like ``hflip+vflip`` or ``rotate90=90`` (ttach's conventions)."""
    for part in name.split("+"):
        if part == "hflip":
            images = images[:, :, ::-1]
        elif part == "vflip":
            images = images[:, ::-1]
        elif part.startswith("rotate90="):
            images = np.rot90(images, int(part.split("=")[1]) // 90, axes=(1, 2))
    return np.ascontiguousarray(images)


@pytest.mark.parametrize("tta", [["hflip", "vflip"], ["rotate90"]])
def test_each_view_is_the_plain_prediction_of_the_transformed_image(tta):
    model = tiny_model()
    images = np.random.default_rng(3).integers(0, 255, (5, 16, 16, 1), dtype=np.uint8)  # no symmetry
    compose = tta_transforms(tta, (16, 16))
    views = predict_views(model, images, np.arange(5), compose, torch.device("cpu"), 2)
    names = view_names(compose, tta)
    assert len(names) == 4 and names[0] == "plain" and len(set(names)) == 4
    for index, name in enumerate(names):
        expected = predict_views(model, transformed(images, name), np.arange(5), None, torch.device("cpu"), 2)[0]
        np.testing.assert_allclose(views[index], expected, atol=1e-5, err_msg=name)
    # The model is not invariant, so a view that silently fell back to the plain image would differ.
    assert all(np.abs(views[index] - views[0]).max() > 1e-4 for index in range(1, 4))


def test_merges_by_hand():
    views = np.array([[[0.5, 0.5]], [[0.9, 0.1]]])
    np.testing.assert_allclose(merge_views(views, "mean"), [[0.7, 0.3]])
    geometric = np.sqrt([0.45, 0.05])
    np.testing.assert_allclose(merge_views(views, "gmean"), [geometric / geometric.sum()])
