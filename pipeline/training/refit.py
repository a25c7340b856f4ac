"""Full-data refit: after cross-validation, one more model trained on every training image.

The folds chose how long to train (the mean of their best epoch counts); the refit model trains
that long on all rows, with no validation rows left to judge it, so it has no OOF and CV cannot
score it: ``train.refit`` is off by default, and infer blends its test probabilities with the
folds' average (``infer.refit_weight``). Like a fold, it is skipped when it finished with the same
settings and resumes from its last.pt when killed.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from pipeline import layout, provenance
from pipeline.artifacts import write_json
from pipeline.config import Config
from pipeline.training import distributed
from pipeline.training.fold_setup import timm_name
from pipeline.training.kfold import FoldResult, FoldStore, TrainingData, build_fold, run_epoch, settings_key
from pipeline.training.loop import autocast_dtype, seed_everything, torch_device

REFIT_FOLD = -1  # the fold number its seeds and settings key use


def refit_epochs(results: list[FoldResult]) -> int:
    """The folds' mean best epoch count (1-based), rounded: how long the full-data model trains."""
    return max(1, int(round(float(np.mean([result.best_epoch + 1 for result in results])))))


def refit_key(cfg: Config, backbone: str, data: TrainingData, epochs: int) -> str:
    return f"{settings_key(cfg, backbone, data, REFIT_FOLD)}-{epochs}"


def train_refit(cfg: Config, backbone: str, data: TrainingData, epochs: int) -> dict:
    """Train (or skip, or resume) the full-data model for ``epochs``; its weights go to refit/best.pt."""
    folder = layout.refit_dir(cfg, backbone)
    label = f"[{backbone}] refit on all {len(data.ids)} images"
    store = FoldStore(folder, refit_key(cfg, backbone, data, epochs), label)
    done = folder / layout.FOLD_DONE
    if done.exists() and json.loads(done.read_text()).get("key") == store.key:
        print(f"{label}: already trained ({epochs} epochs), skipped", file=sys.stderr)
        return json.loads(done.read_text())
    device = torch_device(cfg.runtime.device)
    amp = autocast_dtype(cfg.runtime.amp, device)
    seed_everything(cfg.train.seed + 1000 * REFIT_FOLD)
    rows = np.arange(len(data.ids))
    build = build_fold(cfg, backbone, data, rows, epochs, device, amp)
    progress = store.resume(build, epochs)
    for epoch in range(progress.start_epoch, epochs):
        loss = run_epoch(cfg, build, data, rows, REFIT_FOLD, epoch, epochs, label, device, amp)
        progress.history.append({"epoch": epoch + 1, "train_loss": loss})
        print(f"{label} epoch {epoch + 1}/{epochs}: train_loss {loss:.4f}", file=sys.stderr)
        mean, std = build.model.normalisation()  # the pretrained weights' own, when they set it
        payload = {"model": build.evaluated.state_dict(), "backbone": timm_name(cfg, backbone),
                   "heads": data.heads.to_dict(),
                   "in_chans": cfg.data.channels, "mean": mean, "std": std,
                   "config": provenance.public_config(cfg), "epoch": epoch, "key": store.key}
        store.save_epoch({}, payload, build, progress, improved=epoch == epochs - 1)
    summary = {"key": store.key, "epochs": epochs, "history": progress.history}
    if distributed.is_main():
        write_json(done, summary)
    return summary


def check_refit(checkpoint: dict, cfg: Config, backbone: str, data: TrainingData) -> bool:
    """Whether a refit checkpoint was trained with the current settings (any epoch count the folds chose)."""
    return str(checkpoint.get("key", "")).startswith(settings_key(cfg, backbone, data, REFIT_FOLD) + "-")
