"""Tests for pipeline.training.augment: every preset keeps uint8 H x W x C, for grey and colour images."""

import numpy as np
import pytest
import torch

from pipeline.training.augment import PRESETS, BatchFlips, build_augment

SIZES = [(32, 32), (48, 64)]
ACTIVE_PRESETS = sorted(name for name in PRESETS if name != "none")


def random_images(size, channels, count, seed=0):
    generator = np.random.default_rng(seed)
    return [generator.integers(0, 256, size=(*size, channels), dtype=np.uint8) for _ in range(count)]


@pytest.mark.parametrize("name", ACTIVE_PRESETS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("channels", [1, 3])
def test_preset_keeps_uint8_and_shape(name, size, channels):
    augment = build_augment(name, size, channels, seed=0)
    # Enough calls that the low-probability ops (dropout, blur, colour) fire at least once.
    for image in random_images(size, channels, count=20):
        output = augment(image)
        assert isinstance(output, np.ndarray)
        assert output.dtype == np.uint8
        assert output.shape == image.shape


def test_int_image_size_means_square():
    augment = build_augment("light", 40, 3, seed=0)
    image = random_images((40, 40), 3, count=1)[0]
    assert augment(image).shape == (40, 40, 3)


def test_none_returns_none():
    assert build_augment("none", 32, 3) is None
    assert build_augment("none", (48, 64), 1) is None


@pytest.mark.parametrize("size", SIZES)
def test_flips_changes_some_images(size):
    augment = build_augment("flips", size, 3, seed=0)
    images = random_images(size, 3, count=10)
    changed = [not np.array_equal(augment(image), image) for image in images]
    assert any(changed)


def test_same_seed_gives_same_augmentations():
    images = random_images((32, 32), 3, count=5)
    first = build_augment("heavy", 32, 3, seed=7)
    second = build_augment("heavy", 32, 3, seed=7)
    for image in images:
        assert np.array_equal(first(image), second(image))


def test_wrong_input_shape_is_rejected():
    augment = build_augment("light", 32, 3, seed=0)
    with pytest.raises(ValueError):
        augment(random_images((32, 32), 1, count=1)[0])
    with pytest.raises(ValueError):
        augment(random_images((48, 64), 3, count=1)[0])


class RepeatedImage(torch.utils.data.Dataset):
    """The same image augmented at every index, so workers can be compared."""

    def __init__(self, augment, image):
        self.augment = augment
        self.image = image

    def __len__(self):
        return 16

    def __getitem__(self, index):
        return torch.from_numpy(self.augment(self.image))


def test_dataloader_workers_draw_different_augmentations():
    # Each worker starts from a copy of the same Compose random state; without reseeding, the
    # first item of worker 0 and worker 1 would be identical.
    image = random_images((32, 32), 3, count=1)[0]
    dataset = RepeatedImage(build_augment("heavy", 32, 3, seed=0), image)
    # batch_size=8: worker 0 makes the first batch, worker 1 the second. Eight draws each make
    # an accidental match (every random op skipped alike in both) practically impossible.
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=2)
    first_worker, second_worker = list(loader)
    assert not torch.equal(first_worker, second_worker)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError) as error:
        build_augment("extreme", 32, 3)
    for name in PRESETS:
        assert name in str(error.value)


def test_invalid_channels_rejected():
    with pytest.raises(ValueError):
        build_augment("light", 32, 4)


def dihedral_views(image: torch.Tensor, square: bool) -> list[torch.Tensor]:
    """Every orientation the flips preset can give (C x H x W): 8 for a square, 4 for a rectangle."""
    views = []
    for turned in ([torch.rot90(image, k, dims=(-2, -1)) for k in range(4)] if square else [image]):
        views += [turned, turned.flip(-1), turned.flip(-2), turned.flip(-1).flip(-2)]
    return views


@pytest.mark.parametrize("size", SIZES)
def test_batch_flips_give_each_image_one_of_its_orientations_uniformly(size):
    square = size[0] == size[1]
    batch = torch.from_numpy(np.stack(random_images(size, 3, count=400))).permute(0, 3, 1, 2).contiguous()
    output = BatchFlips(size, seed=0)(batch)
    assert output.dtype == torch.uint8 and output.shape == batch.shape
    counts = {}
    for original, augmented in zip(batch, output):
        views = dihedral_views(original, square)
        matches = [index for index, view in enumerate(views) if torch.equal(view, augmented)]
        assert matches, "an augmented image is not an orientation of its original"
        counts[matches[0]] = counts.get(matches[0], 0) + 1
    distinct = 8 if square else 4  # a random image has no symmetry: its views are all different
    assert len(counts) == distinct and min(counts.values()) > 400 / distinct / 2


def test_batch_flips_follow_their_seed_and_leave_the_input_alone():
    batch = torch.from_numpy(np.stack(random_images((32, 32), 1, count=64))).permute(0, 3, 1, 2).contiguous()
    before = batch.clone()
    first, second = BatchFlips((32, 32), seed=3)(batch), BatchFlips((32, 32), seed=3)(batch)
    assert torch.equal(first, second) and torch.equal(batch, before)
    assert not torch.equal(BatchFlips((32, 32), seed=4)(batch), first)


def test_flips_preset_runs_on_batches_in_training(tmp_path):
    from conftest import make_config

    from pipeline.training import fold_setup

    cfg = make_config(tmp_path / "work")
    assert isinstance(fold_setup.make_batch_augment(cfg, seed=0), BatchFlips)
    assert fold_setup.make_batch_augment(make_config(tmp_path / "work", "train.augment=light"), seed=0) is None
