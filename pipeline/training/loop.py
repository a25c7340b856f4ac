"""One epoch of training and one pass of evaluation (AMP, accumulation, clipping, EMA, channels_last)."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.training import distributed


def torch_device(name: str = "auto") -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"device {name!r} is CUDA but no CUDA device is available; use runtime.device=auto "
                            f"(and train.devices=auto)")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise PipelineError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} "
                            f"CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if name in ("auto", "cuda") and distributed.local_device():  # under torchrun on CUDA: this rank's GPU
        return torch.device(distributed.local_device())
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 (or fp16) on CUDA, none on the CPU where it rarely pays; ``bf16``/``fp16`` force it."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise PipelineError("runtime.amp=fp16 needs CUDA; on the CPU use runtime.amp=bf16 or off")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class StepState:
    """What persists between epochs and goes into the checkpoint with the optimizer."""

    updates: int = 0


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def start_training(model: nn.Module, frozen_norm: bool = False) -> None:
    """``model.train()``; with ``frozen_norm`` its batch norm layers stay in eval mode: they normalise with their
    running statistics and no longer update them (their scale and shift still train)."""
    model.train()
    for module in model.modules() if frozen_norm else []:
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def train_one_epoch(model: nn.Module, loader, optimizer, compute_loss, device: torch.device, *,
                    state: StepState, scheduler=None, per_update_scheduler: bool = True, amp: torch.dtype | None = None,
                    scaler=None, accumulate: int = 1, grad_clip: float | None = None, ema=None, mixup=None,
                    channels_last: bool = False, batch_augment=None, frozen_norm: bool = False,
                    desc: str = "train") -> float:
    """Train for one pass over ``loader``; returns the mean loss.

    ``batch_augment`` (uint8 batch -> uint8 batch) runs on the device before the model, for
    augmentations that are cheaper on a whole batch than per image in the Dataset.

    ``compute_loss(logits, targets)`` gets the concatenated head logits. Gradients of
    ``accumulate`` micro-batches are summed before each optimizer step (each loss divided
    by ``accumulate``, so 2 x 8 gives the gradient of 16 for a model without batch norm).
    A non-finite loss stops training with a message rather than producing garbage.
    """
    start_training(model, frozen_norm)
    total, seen = 0.0, 0
    optimizer.zero_grad(set_to_none=True)
    progress = tqdm(loader, desc=desc, leave=False, file=sys.stderr, mininterval=1.0, dynamic_ncols=True,
                    disable=None)  # None: bars on a terminal only, never in a log
    steps = len(loader)
    for step, (images, targets) in enumerate(progress):
        images = to_device(images, device, channels_last)
        if batch_augment is not None:
            images = batch_augment(images)
        targets = targets.to(device, non_blocking=True)
        if mixup is not None:
            images, targets = mixup(images.float(), targets[:, 0])
        with autocast(device, amp):
            logits = model(images)
            loss = compute_loss(logits, targets)
        if not torch.isfinite(loss):
            raise PipelineError(f"the loss became {loss.item()} at step {step} ({desc}): lower train.lr, "
                                f"set train.grad_clip (e.g. 1.0) or runtime.amp=off")
        (scaler.scale(loss / accumulate) if scaler else loss / accumulate).backward()
        last_step = step + 1 == steps
        if (step + 1) % accumulate == 0 or last_step:
            if scaler:
                scaler.unscale_(optimizer)
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.updates += 1
            if ema is not None:
                ema.update(model, step=state.updates)
            if scheduler is not None and per_update_scheduler:
                if hasattr(scheduler, "step_update"):
                    scheduler.step_update(num_updates=state.updates)
                else:
                    scheduler.step()
        batch = images.shape[0]
        total += loss.item() * batch
        seen += batch
        progress.set_postfix(loss=f"{total / seen:.4f}", refresh=False)
    return total / max(seen, 1)


@torch.no_grad()
def predict_logits(model: nn.Module, loader, device: torch.device, *, amp: torch.dtype | None = None,
                   channels_last: bool = False, desc: str = "predict") -> torch.Tensor:
    """Concatenated head logits (float32, on the CPU) for every image of ``loader``, in order."""
    model.eval()
    outputs = []
    for batch in tqdm(loader, desc=desc, leave=False, file=sys.stderr, mininterval=1.0, dynamic_ncols=True,
                      disable=None):
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        with autocast(device, amp):
            outputs.append(model(to_device(images, device, channels_last)).float().cpu())
    return torch.cat(outputs) if outputs else torch.empty(0)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
