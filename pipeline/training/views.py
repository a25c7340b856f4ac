"""ttach's views of an image batch, from config names: what the infer stage's test-time augmentation and the embed
member's averaged features both read (``infer.tta``, ``embed.tta``). Imports only ttach, so the embed stage does not
depend on the training loop."""

from __future__ import annotations

from pipeline.errors import ConfigError


def tta_transforms(names: list[str], size_hw: tuple[int, int], key: str = "infer.tta"):
    """A ttach Compose from config names (``key``'s, which errors name); its views are the product of the transforms'
    settings."""
    import ttach

    square = size_hw[0] == size_hw[1]
    table = {
        "hflip": ttach.HorizontalFlip,
        "vflip": ttach.VerticalFlip,
        # A quarter turn of a rectangle swaps its sides, so rectangles only get the half turn.
        "rotate90": lambda: ttach.Rotate90(angles=[0, 90, 180, 270] if square else [0, 180]),
        "multiscale": lambda: ttach.Scale(scales=[0.875, 1.0, 1.125], interpolation="bilinear", align_corners=False),
        "brightness": lambda: ttach.Multiply(factors=[0.9, 1.0, 1.1]),
    }
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ConfigError(f"{key} has unknown transform(s) {unknown}; valid: {', '.join(table)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{key} lists a transform twice: {names}")
    return ttach.Compose([table[n]() for n in names]) if names else None
