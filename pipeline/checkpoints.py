"""Checkpoints: written atomically, read with a message that names the file and the fix.

A checkpoint holds the weights, the backbone's name, the heads, the input channels, the
normalisation and the resolved config: enough to rebuild the model alone (nanoGPT's way).
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import torch

from pipeline.artifacts import atomic_path
from pipeline.errors import DataError


def save_checkpoint(path: Path, payload: dict) -> None:
    with atomic_path(path) as temporary:
        try:
            torch.save(payload, temporary)
        except RuntimeError as error:  # torch reports a failed write as a RuntimeError, without errno
            full = shutil.disk_usage(path.parent).free < 16 * 2**20
            raise OSError(errno.ENOSPC if full else None, f"torch.save failed ({str(error)[:120]})") from None


def load_checkpoint(path: Path) -> dict:
    if not path.exists():
        raise DataError(f"checkpoint {path} does not exist: run train first")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated or foreign file raises many types
        raise DataError(f"checkpoint {path} cannot be read ({type(error).__name__}: {str(error)[:120]}); "
                        f"delete it and re-run train") from None
