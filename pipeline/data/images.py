"""The decoded image cache of prepare and the Dataset that reads it.

prepare decodes every image once (``load_image``) into memory-mapped uint8 arrays; training,
inference and EDA open them through ``Cache`` and feed them through ``ImageDataset``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from pipeline.artifacts import read_json, read_table
from pipeline.errors import DataError

if TYPE_CHECKING:  # the config (pydantic) stays out of the code-competition notebook, which decodes with load_image
    from pipeline.config import Config

# ---------------------------------------------------------------- finding and decoding images

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def index_images(folder: Path) -> dict[str, Path]:
    """Map both ``name.ext`` and ``name`` of every image below ``folder`` to its path (the first in sorted order
    when two share a name); empty when ``folder`` is missing. Prepare and the code-competition kernel find a
    competition's images with it, so both read the same files."""
    index: dict[str, Path] = {}
    if not folder.is_dir():
        return index
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            relative = path.relative_to(folder).as_posix()
            index.setdefault(relative, path)
            index.setdefault(relative.rsplit(".", 1)[0], path)
    return index


def to_uint8(image: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode (grayscale, RGBA, palette, 16-bit, float) as 8-bit L or RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        # One fixed scale for every image of a kind (16-bit: 0..65535, float: 0..1), never the
        # image's own maximum, so intensities stay comparable across images.
        if image.mode == "F" and array.max() <= 1.0:
            scale = 255.0
        elif image.mode.startswith("I;16") or array.max() > 255:
            scale = 255.0 / 65535.0
        else:
            scale = 1.0
        image = Image.fromarray(np.clip(np.rint(array * scale), 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "P", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("L" if channels == 1 else "RGB")


def load_image(path: str | Path, size_hw: tuple[int, int], channels: int) -> np.ndarray:
    """Decode one image, convert it to ``channels``, resize (bilinear) to H x W; uint8 H x W x C."""
    with Image.open(path) as image:
        image.load()
        image = to_uint8(image, channels)
        if image.size != (size_hw[1], size_hw[0]):
            image = image.resize((size_hw[1], size_hw[0]), Image.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def try_load_image(task) -> tuple[np.ndarray | None, str | None]:
    """``load_image`` for a worker pool: returns (array, None) or (None, the reason)."""
    path, size_hw, channels = task
    try:
        if Path(path).stat().st_size == 0:
            return None, "empty file (0 bytes)"
        return load_image(path, size_hw, channels), None
    except FileNotFoundError:
        return None, "missing"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        return None, f"cannot be decoded ({error})"


# ---------------------------------------------------------------- the cache

@dataclass
class Cache:
    """The decoded, resized uint8 images of prepare: memory-mapped N x H x W x C arrays."""

    folder: Path
    meta: dict

    @classmethod
    def open(cls, cfg: Config) -> Cache:
        from pipeline import layout

        folder = layout.cache_dir(cfg)
        meta = read_json(folder / layout.CACHE_META, "image cache index", "prepare")
        if tuple(meta["size_hw"]) != cfg.data.size_hw or meta["channels"] != cfg.data.channels:
            raise DataError(f"the image cache {folder} holds {meta['size_hw']} x {meta['channels']}ch images but "
                            f"the config asks for {list(cfg.data.size_hw)} x {cfg.data.channels}ch: run prepare")
        return cls(folder, meta)

    def images(self, split: str, size_hw: tuple[int, int] | None = None) -> np.ndarray:
        """A split's images at ``data.image_size``, or at ``size_hw``: one of the cache's extra sizes."""
        if size_hw is not None and tuple(size_hw) == tuple(self.meta["size_hw"]):
            size_hw = None
        if size_hw is not None and list(size_hw) not in self.meta.get("extra_sizes", []):
            raise DataError(f"the image cache {self.folder} holds no {list(size_hw)} images (it has "
                            f"{[self.meta['size_hw'], *self.meta.get('extra_sizes', [])]}): run prepare")
        from pipeline import layout

        path = self.folder / layout.cache_images_name(split, size_hw)
        try:
            return np.load(path, mmap_mode="r")
        except (FileNotFoundError, ValueError) as error:
            raise DataError(f"image cache {path} is missing or damaged ({error}): run prepare") from None

    def table(self, split: str) -> pd.DataFrame:
        from pipeline import layout

        return read_table(self.folder / layout.cache_index_name(split), "image cache index", "prepare")

    @property
    def class_names(self) -> list[str]:
        return self.meta["class_names"]

    @property
    def mean(self) -> list[float]:
        return self.meta["mean"]

    @property
    def std(self) -> list[float]:
        return self.meta["std"]


class ImageDataset:
    """Cached uint8 images -> (uint8 C x H x W tensor, targets).

    Augmentation runs on uint8 and normalisation is left to the device, on whole batches,
    so a worker moves a quarter of the bytes a float pipeline would.
    """

    def __init__(self, images: np.ndarray, indices: np.ndarray, targets: np.ndarray | None = None,
                 augment=None):
        self.images = images
        self.indices = np.asarray(indices)
        self.targets = targets
        self.augment = augment

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int):
        import torch

        image = np.asarray(self.images[self.indices[item]])
        if self.augment is not None:
            image = self.augment(image)
        # One copy into C x H x W order; it also detaches the sample from the read-only memory map.
        tensor = torch.from_numpy(np.array(image.transpose(2, 0, 1), order="C"))
        if self.targets is None:
            return tensor
        return tensor, torch.as_tensor(self.targets[item])
