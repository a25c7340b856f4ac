"""Checkpoints: written atomically, read with a message that names the file and the fix.

A checkpoint holds the weights, the backbone's name, the heads, the input channels, the
normalisation and the resolved config: enough to rebuild the model alone (nanoGPT's way).

Checkpoints travel between machines (a DVC remote, a teammate's folder), so they are read with
``torch.load(weights_only=True)``: tensors and plain values only, so loading a file cannot run its
code. NumPy arrays and scalars, which that loader refuses, are stored as tensors and plain numbers
and come back as NumPy arrays and numbers.
"""

from __future__ import annotations

import errno
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from pipeline.artifacts import atomic_path
from pipeline.errors import DataError
from pipeline.training.models import Heads, ProbabilityModel, create_model

NUMPY_ARRAY = "__numpy_array__"  # marks a NumPy array stored as a tensor, so that loading gives back an array


def to_plain(value):
    """``value`` with NumPy arrays as marked tensors and NumPy scalars as Python numbers (for weights_only)."""
    if isinstance(value, np.ndarray):
        return {NUMPY_ARRAY: torch.from_numpy(np.ascontiguousarray(value))}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(item) for item in value)
    return value


def from_plain(value):
    """The inverse of ``to_plain``: marked tensors become NumPy arrays again."""
    if isinstance(value, dict):
        if set(value) == {NUMPY_ARRAY}:
            return value[NUMPY_ARRAY].numpy()
        return {key: from_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(from_plain(item) for item in value)
    return value


def save_checkpoint(path: Path, payload: dict) -> None:
    payload = to_plain(payload)
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
        return from_plain(torch.load(path, map_location="cpu", weights_only=True))
    except pickle.UnpicklingError as error:  # weights_only refused an object: the file could run code
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = found.group(1) if found else type(error).__name__
        raise DataError(f"checkpoint {path} holds more than tensors and plain values ({what}), so it is not loaded: "
                        f"loading it could run code. Re-train it, or load it yourself only if you trust where it "
                        f"came from") from None
    except Exception as error:  # a truncated or foreign file raises many types
        raise DataError(f"checkpoint {path} cannot be read ({type(error).__name__}: {str(error)[:120]}); "
                        f"delete it and re-run train") from None


def load_fold_model(path, class_names: list[str], device) -> tuple[ProbabilityModel, dict]:
    """Rebuild a fold's model from its checkpoint alone (backbone, heads, channels, normalisation)."""
    checkpoint = load_checkpoint(path)
    heads = Heads.from_dict(checkpoint["heads"])
    if heads.class_names != class_names:
        raise DataError(f"checkpoint {path} was trained on classes {heads.class_names}, the cache has {class_names}: "
                        f"re-run train")
    model = create_model(checkpoint["backbone"], heads, checkpoint["in_chans"], checkpoint["mean"], checkpoint["std"])
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise DataError(f"checkpoint {path} does not fit its backbone ({str(error)[:160]}); re-run train") from None
    return ProbabilityModel(model, heads).to(device), checkpoint
