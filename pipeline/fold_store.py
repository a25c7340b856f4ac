"""One fold's parts that outlive an epoch: what trains it (``FoldBuild``), where it stands (``FoldProgress``), what it
returns (``FoldResult``) and its folder (``FoldStore``: done.json and the validation probabilities when finished,
last.pt to resume, best.pt for infer; ``FoldStore(None, ...)`` keeps nothing, as tuning trials do).
``pipeline.kfold`` builds and trains folds with them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline import distributed, layout
from pipeline.artifacts import atomic_path, write_json
from pipeline.checkpoints import load_checkpoint, save_checkpoint
from pipeline.engine import StepState


@dataclass
class FoldBuild:
    """The objects that train one fold."""

    model: torch.nn.Module
    forward_model: torch.nn.Module  # the model, or its torch.compile'd form
    compute_loss: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    per_update: bool  # the scheduler steps per optimizer update (else per epoch, on the score)
    scaler: object
    ema: object
    mixup: object
    state: StepState = field(default_factory=StepState)

    @property
    def evaluated(self) -> torch.nn.Module:
        """What is validated and saved as best.pt: the EMA weights when EMA is on."""
        return self.ema.module if self.ema is not None else self.model


@dataclass
class FoldProgress:
    """Where a fold stands: resumed from last.pt, returned when it ends."""

    start_epoch: int = 0
    best_score: float | None = None
    best_epoch: int = -1
    stale: int = 0
    history: list[dict] = field(default_factory=list)
    best_proba: np.ndarray | None = None


@dataclass
class FoldResult:
    fold: int
    best_score: float
    best_epoch: int
    validation_indices: np.ndarray
    validation_proba: np.ndarray
    history: list[dict]


class FoldStore:
    """A fold's folder, or nothing (``folder=None``: a tuning trial keeps nothing on disk).

    done.json + validation.npy mark a finished fold (with its settings key), last.pt is the
    state to resume from after each epoch, best.pt the best epoch's weights for infer.
    """

    def __init__(self, folder: Path | None, key: str, label: str):
        self.folder, self.key, self.label = folder, key, label
        self.loggers = None  # the fold's loggers (pipeline.loggers.FoldLoggers), opened by train_fold

    def finished(self) -> dict | None:
        """The summary of a fold finished with the same settings, else None."""
        if self.folder is None:
            return None
        done, validation = self.folder / layout.FOLD_DONE, self.folder / layout.FOLD_VALIDATION
        if not (done.exists() and validation.exists()):
            return None
        summary = json.loads(done.read_text())
        return {**summary, "proba": np.load(validation)} if summary.get("key") == self.key else None

    def resume(self, build: FoldBuild, epochs: int) -> FoldProgress:
        """The progress saved in last.pt, loaded into ``build``; a fresh start when there is none or it is stale."""
        last = self.folder / layout.FOLD_LAST if self.folder is not None else None
        if last is None or not last.exists():
            return FoldProgress()
        checkpoint = load_checkpoint(last)
        if checkpoint.get("key") != self.key:
            print(f"{self.label}: settings changed since {last}; starting afresh", file=sys.stderr)
            return FoldProgress()
        build.model.load_state_dict(checkpoint["model"])
        build.optimizer.load_state_dict(checkpoint["optimizer"])
        for name in ("scheduler", "ema", "scaler"):
            part = getattr(build, name)
            if part is not None and checkpoint.get(name) is not None:
                part.load_state_dict(checkpoint[name])
        build.state.updates = checkpoint["updates"]
        progress = FoldProgress(checkpoint["epoch"] + 1, checkpoint["best_score"], checkpoint["best_epoch"],
                                checkpoint["stale"], checkpoint["history"], checkpoint.get("best_proba"))
        print(f"{self.label}: resuming from {last} at epoch {progress.start_epoch + 1}/{epochs}", file=sys.stderr)
        return progress

    def save_epoch(self, record: dict, payload: dict, build: FoldBuild, progress: FoldProgress,
                   improved: bool) -> None:
        """Write best.pt when the epoch improved and last.pt always, then log its metrics (``record``) to the
        fold's loggers: after the save, so that a fold resumed from last.pt never logs an epoch twice."""
        if self.folder is not None and distributed.is_main():  # under torchrun rank 0 writes for all
            if improved:
                save_checkpoint(self.folder / layout.checkpoint_name("best"), payload)
            parts = {name: getattr(build, name).state_dict() if getattr(build, name) is not None else None
                     for name in ("optimizer", "scheduler", "ema", "scaler")}
            save_checkpoint(self.folder / layout.FOLD_LAST, {
                **payload, "model": build.model.state_dict(), **parts, "updates": build.state.updates,
                "best_score": progress.best_score, "best_epoch": progress.best_epoch, "stale": progress.stale,
                "history": progress.history, "best_proba": progress.best_proba})
        if self.loggers is not None and record:
            self.loggers.log(record, step=payload["epoch"])

    def finish(self, progress: FoldProgress) -> None:
        if self.loggers is not None:
            self.loggers.close()
        if self.folder is None or not distributed.is_main():
            return
        with atomic_path(self.folder / layout.FOLD_VALIDATION) as temporary, open(temporary, "wb") as handle:
            np.save(handle, progress.best_proba)
        write_json(self.folder / layout.FOLD_DONE, {"key": self.key, "best_score": progress.best_score,
                                                    "best_epoch": progress.best_epoch, "history": progress.history})
