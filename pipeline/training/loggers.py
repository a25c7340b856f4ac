"""Where each fold's per-epoch metrics go: the loggers that ``train.loggers`` names.

A logger is a small object with ``log(metrics, step)`` and ``close()``. ``open_fold_loggers`` opens the chosen
ones for one fold of one backbone and returns them as one (``FoldLoggers``); the train stage hands that opener to
``pipeline.training.kfold``, whose fold store calls it after every epoch, so the k-fold loop knows no logger by
name and
tuning trials log nothing. Each logger writes into its own folder of ``paths.logs`` (``pipeline.layout``):

- ``dvclive``: DVCLive's metrics.json and per-metric TSVs (no DVC experiment is created from here);
- ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` event files, ``tensorboard --logdir <logs>/tensorboard``;
- ``wandb``: one Weights & Biases run per backbone and fold, grouped by backbone, offline unless ``WANDB_MODE``
  is set (``wandb sync`` uploads the runs later).

The packages of ``tensorboard`` and ``wandb`` are optional extras: ``check_loggers`` fails before any work with
the extra to install.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pipeline import layout, provenance
from pipeline.config import Config
from pipeline.errors import ConfigError

# logger -> (the package it needs, the pyproject extra that installs it; None: a core dependency)
PACKAGES = {"dvclive": ("dvclive", None), "tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
FOLD_FOLDERS = ("dvclive", "tensorboard")  # the loggers that keep a folder per fold (layout.fold_logs_dir)


class EpochLogger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def check_loggers(cfg: Config) -> None:
    """Raise ConfigError when a logger of ``train.loggers`` lacks its package, naming the extra to install."""
    for name in cfg.train.loggers:
        package, extra = PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            install = f"pip install 'kaggle-image-pipeline[{extra}]'" if extra else f"pip install {package}"
            raise ConfigError(f"train.loggers names {name!r}, but the {package} package is not installed: "
                              f"{install}, or remove {name!r} from train.loggers")


class DVCLiveLogger:
    def __init__(self, cfg: Config, backbone: str, fold: int, resume: bool):
        from dvclive import Live

        folder = layout.fold_logs_dir(cfg, "dvclive", backbone, fold)
        if not resume:
            shutil.rmtree(folder, ignore_errors=True)
        self.live = Live(dir=str(folder), resume=resume, save_dvc_exp=False, dvcyaml=None, report=None)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.live.step = step
        for name, value in metrics.items():
            self.live.log_metric(name, value)
        self.live.next_step()

    def close(self) -> None:
        self.live.end()


class TensorBoardLogger:
    def __init__(self, cfg: Config, backbone: str, fold: int, resume: bool):
        from torch.utils.tensorboard import SummaryWriter

        folder = layout.fold_logs_dir(cfg, "tensorboard", backbone, fold)
        if not resume:  # a fold trained afresh must not show the old run's points beside the new ones
            shutil.rmtree(folder, ignore_errors=True)
        self.writer = SummaryWriter(log_dir=str(folder))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # once an epoch: a TensorBoard open during training sees each epoch as it ends

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, cfg: Config, backbone: str, fold: int, resume: bool):  # a resumed fold is a new run
        import wandb

        folder = os.environ.get("WANDB_DIR") or layout.wandb_dir(cfg)  # wandb makes its `wandb/` folder inside
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=cfg.train.wandb_project, group=backbone, name=f"{backbone}-fold{fold}",
                              job_type="train", dir=str(folder), config=provenance.public_config(cfg),
                              mode=None if os.environ.get("WANDB_MODE") else "offline")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class FoldLoggers:
    """The opened loggers of one fold, called as one."""

    def __init__(self, loggers: list[EpochLogger]):
        self.loggers = loggers

    def log(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


# name -> the class that opens it for a fold: (cfg, backbone, fold, resume)
LOGGERS: dict[str, Callable[[Config, str, int, bool], EpochLogger]] = {
    "dvclive": DVCLiveLogger, "tensorboard": TensorBoardLogger, "wandb": WandbLogger}


def open_fold_loggers(cfg: Config, backbone: str, fold: int, resume: bool) -> FoldLoggers:
    """The loggers of ``train.loggers`` opened for one fold (``resume``: the fold continues from last.pt).

    A logger that fails to open (DVCLive probing a repository it cannot read, wandb online without a key) is
    reported and left out: logging must never stop training.
    """
    opened = []
    for name in cfg.train.loggers:
        try:
            opened.append(LOGGERS[name](cfg, backbone, fold, resume))
        except Exception as error:  # each library raises its own types
            print(f"[{backbone}] fold {fold}: {name} logging off, it failed to start: {type(error).__name__}: "
                  f"{error}", file=sys.stderr)
    return FoldLoggers(opened)
