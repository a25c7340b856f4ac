"""Test-time augmentation: ttach's views of a batch on the device, merged as probabilities.

Shared by the infer stage and the code-competition notebook (``pipeline.kaggle_notebook``), which runs offline
with torch, timm, pandas, numpy and the vendored project: this module imports nothing heavier (no config).
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from pipeline.data.images import ImageDataset
from pipeline.training.loop import autocast, to_device
from pipeline.training.models import ProbabilityModel


def view_names(compose, tta: list[str]) -> list[str]:
    """A readable name per view, e.g. ``hflip+rotate90=180``; the identity view is ``plain``."""
    if compose is None:
        return ["plain"]
    names = []
    for params in compose.aug_transform_parameters:
        parts = [name if isinstance(p, bool) else f"{name}={p}"
                 for name, t, p in zip(tta, compose.aug_transforms, params) if p != t.identity_param]
        names.append("+".join(parts) or "plain")
    return names


@torch.no_grad()
def predict_views(model: ProbabilityModel, images: np.ndarray, indices: np.ndarray, compose, device,
                  batch_size: int, amp=None, channels_last: bool = False, desc: str = "tta") -> np.ndarray:
    """Probabilities of every view: V x N x C. Each batch is moved to the device once and every view
    is computed there, so k views cost k forward passes and one transfer."""
    from tqdm import tqdm

    model.eval()
    loader = torch.utils.data.DataLoader(ImageDataset(images, indices), batch_size=batch_size, shuffle=False,
                                         pin_memory=device.type == "cuda")
    outputs = []
    for batch in tqdm(loader, desc=desc, leave=False, file=sys.stderr, mininterval=1.0, disable=None):
        x = to_device(batch, device, channels_last).float()
        views = [x] if compose is None else [t.augment_image(x) for t in compose]
        with autocast(device, amp):
            outputs.append(torch.stack([model(v).float() for v in views]).cpu())
    return torch.cat(outputs, dim=1).numpy().astype(np.float64)


def merge_views(view_proba: np.ndarray, mode: str) -> np.ndarray:
    """V x N x C probabilities -> N x C, by arithmetic or geometric mean; rows sum to 1."""
    if mode == "gmean":
        merged = np.exp(np.log(np.clip(view_proba, 1e-12, 1.0)).mean(axis=0))
    else:
        merged = view_proba.mean(axis=0)
    return merged / merged.sum(axis=1, keepdims=True)
