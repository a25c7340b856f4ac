"""Training-time augmentation presets built with albumentations (written against 2.0.x).

Contract: the input is a uint8 numpy image H x W x C (C = 1 or 3) that the image cache has
already resized to the training size, and the output is a uint8 numpy image of the same shape.
Normalisation to float happens later, on the device and per batch, so the presets contain no
``Normalize`` and no ``ToTensorV2``: uint8 is a quarter of the memory traffic of float32 through
the DataLoader.

Every geometric op keeps the image size: flips, ``Affine`` with a reflected border, a
``RandomResizedCrop`` back to the same size, and ``RandomRotate90`` only for square images
(on a rectangle it would swap height and width).
"""

from __future__ import annotations

import os
from collections.abc import Callable

# albumentations 2.x checks PyPI for a newer version on import (a network call with a 2 s
# timeout, repeated in every spawned process); Kaggle kernels run offline, so switch it off unless the
# caller decided otherwise. It only takes effect if this module is the first to import it.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A
import cv2
import numpy as np
import torch

# Reflection instead of a constant fill: black corners after a rotation are an artefact that a
# model can learn as a feature; reflected content looks like more of the same image.
BORDER_MODE = cv2.BORDER_REFLECT_101


def _flips(image_size: tuple[int, int], channels: int) -> A.Compose:
    """Horizontal and vertical flips, plus 90-degree rotations when the image is square.

    For texture or inspection images (solar cells, microscopy) where orientation means nothing.
    """
    transforms = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    height, width = image_size
    if height == width:
        # On a rectangle the two flips already give every size-preserving orientation.
        transforms.append(A.RandomRotate90(p=1.0))
    return A.Compose(transforms)


def _light(image_size: tuple[int, int], channels: int) -> A.Compose:
    """Horizontal flip, a small shift/scale/rotate and brightness/contrast jitter."""
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.Affine(
                scale=(0.9, 1.1),
                translate_percent=(-0.05, 0.05),
                rotate=(-10, 10),
                border_mode=BORDER_MODE,
                p=0.5,
            ),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
        ]
    )


def _heavy(image_size: tuple[int, int], channels: int) -> A.Compose:
    """Light preset with stronger geometry, blur/noise, coarse dropout and (RGB only) colour jitter."""
    transforms = [
        A.HorizontalFlip(p=0.5),
        A.RandomResizedCrop(size=image_size, scale=(0.6, 1.0), ratio=(0.75, 4 / 3), p=0.5),
        A.Affine(
            scale=(0.8, 1.2),
            translate_percent=(-0.1, 0.1),
            rotate=(-30, 30),
            shear=(-10, 10),
            border_mode=BORDER_MODE,
            p=0.7,
        ),
        A.RandomBrightnessContrast(brightness_limit=0.3, contrast_limit=0.3, p=0.7),
        A.OneOf(
            [
                A.GaussianBlur(blur_limit=(3, 5), p=1.0),
                A.MotionBlur(blur_limit=(3, 5), p=1.0),
                # std_range is a fraction of the maximum value (255 for uint8).
                A.GaussNoise(std_range=(0.02, 0.08), p=1.0),
            ],
            p=0.4,
        ),
        A.CoarseDropout(
            num_holes_range=(1, 8),
            hole_height_range=(0.05, 0.15),
            hole_width_range=(0.05, 0.15),
            fill=0,
            p=0.5,
        ),
    ]
    if channels == 3:
        # Hue and saturation only exist for colour images; on one channel the op would fail.
        transforms.append(A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=10, p=0.3))
    return A.Compose(transforms)


def _face(image_size: tuple[int, int], channels: int) -> A.Compose:
    """Portrait photos: horizontal flip only (faces are never upside down), small affine, small holes."""
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.Affine(
                scale=(0.95, 1.05),
                translate_percent=(-0.05, 0.05),
                rotate=(-10, 10),
                border_mode=BORDER_MODE,
                p=0.5,
            ),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
            # Small holes only: a large one could cover the mouth/nose region that decides the label.
            A.CoarseDropout(
                num_holes_range=(1, 4),
                hole_height_range=(0.05, 0.1),
                hole_width_range=(0.05, 0.1),
                fill=0,
                p=0.3,
            ),
        ]
    )


def _none(image_size: tuple[int, int], channels: int) -> None:
    """No augmentation."""
    return


# Each builder takes (image_size as (height, width), channels): the channel count is needed so
# colour-only ops are left out for grey images.
PRESETS: dict[str, Callable[[tuple[int, int], int], A.Compose | None]] = {
    "none": _none,
    "flips": _flips,
    "light": _light,
    "heavy": _heavy,
    "face": _face,
}


class Augmenter:
    """Callable applying an albumentations pipeline to one uint8 H x W x C image.

    A class rather than a closure so it pickles into DataLoader worker processes.
    """

    def __init__(self, compose: A.Compose, image_size: tuple[int, int], channels: int) -> None:
        self.compose = compose
        self.image_size = image_size
        self.channels = channels
        self._process_id = os.getpid()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Augment one uint8 H x W x C image; the result has the same shape and dtype."""
        expected_shape = (*self.image_size, self.channels)
        if image.dtype != np.uint8 or image.shape != expected_shape:
            raise ValueError(
                f"expected a uint8 image of shape {expected_shape}, got {image.dtype} {image.shape}"
            )
        self._reseed_in_new_worker()
        augmented = self.compose(image=image)["image"]
        if augmented.ndim == 2:
            # Some OpenCV-backed ops drop a trailing channel axis of size 1.
            augmented = augmented[:, :, np.newaxis]
        return np.ascontiguousarray(augmented, dtype=np.uint8)

    def _reseed_in_new_worker(self) -> None:
        # Compose keeps its own random generator (it ignores numpy/torch global seeds), and every
        # forked DataLoader worker inherits the same generator state, so all workers would draw
        # identical augmentations. Reseed once per process from torch's per-worker seed, which
        # differs per worker and per epoch and follows torch.manual_seed for reproducibility.
        process_id = os.getpid()
        if process_id == self._process_id:
            return
        self._process_id = process_id
        worker_info = torch.utils.data.get_worker_info()
        if worker_info is not None:
            self.compose.set_random_seed(worker_info.seed % 2**32)


class BatchFlips:
    """The ``flips`` preset on a whole uint8 batch (N x C x H x W) at once, on the batch's device.

    Per image, independently: a horizontal flip (p 0.5), a vertical flip (p 0.5) and, for square
    images, a rotation by k x 90 degrees with k uniform in 0..3: the distribution of the per-image
    albumentations preset. Profiling the CPU training loop showed albumentations' per-image call
    as three quarters of the data path (about 5% of a lcnet_050 step at 96 px); on a batch tensor
    the same flips cost a few index copies. The draws come from a CPU generator seeded like the
    epoch's sampler, so a resumed run repeats them.
    """

    def __init__(self, image_size: tuple[int, int], seed: int) -> None:
        self.square = image_size[0] == image_size[1]
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        count = images.shape[0]
        flips = torch.rand(count, 2, generator=self.generator) < 0.5
        turns = torch.randint(0, 4, (count,), generator=self.generator) if self.square else None
        images = images.clone()
        for chosen, dims in ((flips[:, 0], (-1,)), (flips[:, 1], (-2,))):
            index = chosen.nonzero().flatten().to(images.device)
            if len(index):
                images[index] = images[index].flip(dims)
        if turns is not None:
            for k in (1, 2, 3):
                index = (turns == k).nonzero().flatten().to(images.device)
                if len(index):
                    images[index] = torch.rot90(images[index], k, dims=(-2, -1))
        return images


BATCH_PRESETS = {"flips": BatchFlips}  # presets that run on batches instead of per image


def _as_size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) from an int or a pair, validated."""
    if isinstance(image_size, (int, np.integer)):
        size = (int(image_size), int(image_size))
    else:
        size = tuple(int(value) for value in image_size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return size


def build_augment(
    name: str,
    image_size: int | tuple[int, int],
    channels: int,
    seed: int | None = None,
) -> Augmenter | None:
    """Build preset ``name``: a callable uint8 HxWxC -> uint8 HxWxC, or None for ``none``.

    ``image_size`` is an int (square) or (height, width); ``seed`` makes the sequence of
    augmentations reproducible (DataLoader workers are reseeded from torch's worker seed).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown augmentation preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    size = _as_size(image_size)
    compose = PRESETS[name](size, channels)
    if compose is None:
        return None
    compose.set_random_seed(seed)
    return Augmenter(compose, size, channels)
