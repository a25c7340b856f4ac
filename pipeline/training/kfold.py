"""The k-fold engine: the data a backbone trains on, one fold trained start to finish, and the folds.

One fold is three parts, each readable alone:

- ``build_fold``: the model, loss, optimizer, scheduler, EMA and mixup of the fold (``pipeline.training.fold_setup``);
- ``FoldStore``: the fold's folder (``done.json`` and the validation probabilities when
  finished, ``last.pt`` to resume, ``best.pt`` for infer: the epoch ``train.keep_epoch`` keeps). Tuning trials use
  ``FoldStore(None, ...)``, which keeps nothing on disk;
- ``train_fold``: the epoch loop (train one epoch, validate, remember the kept epoch, save, stop early).

A fold that finished with the same settings is not trained again; a fold killed mid-way
continues from last.pt (model, optimizer, scheduler, EMA, epoch); changed settings start the fold
afresh. Each epoch is seeded from (seed, fold, epoch), so the same config gives the same OOF on
the CPU, resumed or not. ``cross_validate`` trains the folds in turn, or at once on the devices of
``train.devices`` (``pipeline.training.devices``: one worker process per device).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from pydantic import ValidationError

from pipeline import layout, metrics, provenance
from pipeline.artifacts import atomic_path, write_json
from pipeline.config import Config
from pipeline.data.competition import encode_labels
from pipeline.data.images import Cache
from pipeline.data.stage_tables import read_folds
from pipeline.errors import ConfigError, DataError, PipelineError
from pipeline.training import distributed, fold_setup
from pipeline.training.checkpoints import load_checkpoint, save_checkpoint
from pipeline.training.devices import run_on_devices
from pipeline.training.loop import (
    StepState,
    autocast_dtype,
    predict_logits,
    seed_everything,
    torch_device,
    train_one_epoch,
)
from pipeline.training.models import Heads, create_model, set_backbone_frozen

# ---------------------------------------------------------------- one fold's parts that outlive an epoch

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
        self.loggers = None  # the fold's loggers (pipeline.training.loggers.FoldLoggers), opened by train_fold

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


# ---------------------------------------------------------------- inputs


@dataclass
class TrainingData:
    """Everything a fold needs, read once per backbone."""

    images: np.ndarray  # memory-mapped N x H x W x C uint8
    ids: np.ndarray
    folds: np.ndarray
    targets: np.ndarray  # N x (heads + aux) class indices
    labels: np.ndarray  # N submitted-class indices
    heads: Heads
    mean: list[float]
    std: list[float]
    cache_fingerprint: str = ""  # prepare's digest of the images' bytes, ids and labels


def load_training_data(cfg: Config) -> TrainingData:
    """Join the cache with folds.csv and encode every head's labels."""
    cache = Cache.open(cfg)
    table = cache.table("train")
    folds = read_folds(cfg)
    if set(folds["id"].astype(str)) != set(table["id"].astype(str)):
        raise DataError(f"{layout.folds_file(cfg)} and the image cache hold different ids: "
                        f"re-run folds after prepare")
    fold_of = dict(zip(folds["id"].astype(str), folds["fold"].astype(int)))
    heads = Heads.from_meta(cache.meta, cfg.data.aux_cols)
    columns = []
    for name, class_names in heads.heads + heads.aux:
        column = "target" if name == "target" else name
        columns.append(encode_labels(table[column], class_names, f"column {column!r} of the cache"))
    targets = np.stack(columns, axis=1)
    labels = encode_labels(table["target"], heads.class_names, "the cache")
    return TrainingData(images=cache.images("train"), ids=table["id"].astype(str).to_numpy(),
                        folds=np.array([fold_of[i] for i in table["id"].astype(str)]), targets=targets,
                        labels=labels, heads=heads, mean=cache.mean, std=cache.std,
                        cache_fingerprint=cache.meta.get("fingerprint", ""))


def tuned_config(cfg: Config, backbone: str) -> Config:
    """The config with this backbone's own overrides (``backbones.<name>``), then its tuned parameters
    when tuning found some and use_tuned is on."""
    cfg = cfg.for_backbone(backbone)
    path = layout.best_params_file(cfg, backbone)
    if not cfg.train.use_tuned or not path.exists():
        return cfg
    fix = "delete it and re-run tune, or set train.use_tuned=false"
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML ({error}); {fix}") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path} must map train keys to values; {fix}")
    unknown = [k for k in params if k not in type(cfg.train).model_fields]
    if unknown:
        raise ConfigError(f"{path} names unknown train key(s) {unknown}; {fix}")
    try:
        return cfg.with_train(params)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})"
                             for e in error.errors())
        raise ConfigError(f"{path} sets invalid values: {problems}; {fix}") from None


# Train keys that leave a fold's result alone: changing them must not retrain it.
# The pseudo-label keys shape the second round only, which is kept under a key of its own (pipeline.training.pseudo).
NOT_SETTINGS = {"folds", "loggers", "wandb_project", "devices", "pseudo_label", "pseudo_threshold"}


def settings_key(cfg: Config, backbone: str, data: TrainingData, fold: int) -> str:
    """A digest of everything a fold's result depends on (settings, ids, folds, labels, the images and the code
    of training); a change starts the fold afresh."""
    relevant = {"backbone": backbone, "fold": fold, "train": cfg.train.model_dump(exclude=NOT_SETTINGS),
                "code": provenance.training_code_digest(), "images": data.cache_fingerprint,
                "runtime": cfg.runtime.model_dump(exclude={"num_workers", "eval_batch_size"}), "metric": cfg.metric,
                "data": [list(cfg.data.size_hw), cfg.data.channels, cfg.data.aux_cols],
                "heads": data.heads.to_dict()}
    if distributed.active():  # batch norm sees each rank's share of a batch: not the single-process training
        relevant["world_size"] = distributed.world_size()
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode())
    # The ids as text: an object array's bytes are pointers, different in every process, which
    # made every new process see "changed settings" and never resume or skip a finished fold.
    digest.update("\0".join(map(str, data.ids)).encode())
    digest.update(data.folds.tobytes())
    digest.update(data.targets.tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- one fold: what is built, what is kept

def build_fold(cfg: Config, backbone: str, data: TrainingData, train_indices: np.ndarray, epochs: int,
               device: torch.device, amp) -> FoldBuild:
    """Model (seeded by the caller), loss, optimizer, scheduler, AMP scaler, EMA and mixup of one fold."""
    model = create_model(fold_setup.timm_name(cfg, backbone), data.heads, cfg.data.channels, data.mean, data.std,
                         cfg.train.pretrained, cfg.train.pretrained_file, cfg.train.drop_rate,
                         cfg.train.drop_path_rate).to(device)
    if cfg.runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    compute_loss, losses = fold_setup.make_loss(cfg.train, data.heads, data.targets[train_indices])
    for loss in losses:
        loss.to(device)
    optimizer = fold_setup.make_optimizer(cfg.train, model)
    probe_loader = fold_setup.make_train_loader(cfg, data, train_indices, device, seed=0)
    steps_per_epoch = max(1, -(-len(probe_loader) // cfg.train.accumulate))
    scheduler, per_update = fold_setup.make_scheduler(cfg.train, optimizer, steps_per_epoch, epochs)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    ema = None
    if cfg.train.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.train.ema_decay)
    mixup = fold_setup.make_mixup(cfg.train, data.heads)
    forward_model = distributed.wrap(model, device)  # DistributedDataParallel under torchrun
    forward_model = torch.compile(forward_model) if cfg.runtime.compile else forward_model
    return FoldBuild(model, forward_model, compute_loss, optimizer, scheduler, per_update, scaler, ema, mixup)


# ---------------------------------------------------------------- one fold: the epoch loop

def fold_indices(cfg: Config, data: TrainingData, fold: int, train_subset: int | None):
    """(training, validation) row indices of a fold; ``train_subset`` draws a seeded subset of the training rows."""
    train_indices = np.flatnonzero(data.folds != fold)
    validation_indices = np.flatnonzero(data.folds == fold)
    if train_subset and train_subset < len(train_indices):
        rng = np.random.default_rng(cfg.train.seed + fold)
        train_indices = np.sort(rng.choice(train_indices, train_subset, replace=False))
    if len(validation_indices) == 0:
        raise DataError(f"fold {fold} has no validation images in {layout.folds_file(cfg)}")
    return train_indices, validation_indices


def train_fold(cfg: Config, backbone: str, data: TrainingData, fold: int, out_dir: Path | None, on_epoch=None,
               epochs: int | None = None, train_subset: int | None = None, open_loggers=None,
               device: str | None = None, key: str | None = None, label: str | None = None) -> FoldResult:
    """Train one fold; returns the kept epoch's validation probabilities (``train.keep_epoch``: the last or the best).

    ``out_dir`` (None: keep nothing on disk, as tuning trials do) receives best.pt, last.pt and done.json.
    ``on_epoch(epoch, score)`` is called after every validation, which is how Optuna prunes; it may raise to stop
    the fold. ``open_loggers(fold, resume)`` opens the loggers every epoch's metrics go to
    (``pipeline.training.loggers``; None: none, as in tuning trials). ``device``: a device worker's own (None:
    ``runtime.device``). ``key``: the settings key the fold is kept under and ``label`` its name in messages (None:
    ``settings_key`` and ``[backbone] fold k``; a pseudo-label round passes its own).
    """
    epochs = epochs or cfg.train.epochs
    label = label or f"[{backbone}] fold {fold}"
    device = torch_device(device or cfg.runtime.device)
    amp = autocast_dtype(cfg.runtime.amp, device)
    train_indices, validation_indices = fold_indices(cfg, data, fold, train_subset)
    store = FoldStore(out_dir, key or settings_key(cfg, backbone, data, fold), label)
    done = store.finished()
    if done is not None:
        print(f"{label}: already trained (best {cfg.metric} {done['best_score']:.4f} at epoch "
              f"{done['best_epoch'] + 1}), skipped", file=sys.stderr)  # best_epoch counts from 0, the log from 1
        return FoldResult(fold, done["best_score"], done["best_epoch"], validation_indices, done["proba"],
                          done["history"])

    seed_everything(cfg.train.seed + 1000 * fold)
    build = build_fold(cfg, backbone, data, train_indices, epochs, device, amp)
    progress = store.resume(build, epochs)
    if open_loggers is not None and distributed.is_main():
        store.loggers = open_loggers(fold, progress.start_epoch > 0)
    y_true = data.labels[validation_indices]
    for epoch in range(progress.start_epoch, epochs):
        started = time.perf_counter()
        train_loss = run_epoch(cfg, build, data, train_indices, fold, epoch, epochs, label, device, amp)
        proba = validate(cfg, build.evaluated, data, validation_indices, device, amp, f"{label} epoch {epoch + 1}")
        record, improved = score_epoch(cfg, build, progress, y_true, proba, epoch, train_loss, started)
        print(f"{label} epoch {epoch + 1}/{epochs}: train_loss {train_loss:.4f} val_loss {record['val_loss']:.4f} "
              f"{cfg.metric} {record[cfg.metric]:.4f}{' *' if improved else ''} ({record['seconds']}s)",
              file=sys.stderr)
        mean, std = build.model.normalisation()  # the pretrained weights' own, when they set it
        payload = {"model": build.evaluated.state_dict(), "backbone": fold_setup.timm_name(cfg, backbone),
                   "heads": data.heads.to_dict(),
                   "in_chans": cfg.data.channels, "mean": mean, "std": std,
                   "config": provenance.public_config(cfg), "epoch": epoch, "score": record[cfg.metric],
                   "key": store.key}
        store.save_epoch({k: record[k] for k in ("train_loss", "val_loss", cfg.metric, "lr")}, payload, build,
                         progress, improved)
        if on_epoch is not None:
            on_epoch(epoch, record[cfg.metric])
        if cfg.train.patience and progress.stale >= cfg.train.patience:
            print(f"{label}: no improvement for {progress.stale} epochs, stopping early", file=sys.stderr)
            break
    store.finish(progress)
    return FoldResult(fold, progress.best_score, progress.best_epoch, validation_indices, progress.best_proba,
                      progress.history)


def validate(cfg: Config, model, data: TrainingData, validation_indices: np.ndarray, device, amp,
             label: str) -> np.ndarray:
    """The validation images' class probabilities (each rank predicts its share under torchrun; all get the whole)."""
    loader = fold_setup.make_eval_loader(cfg, data.images, distributed.shard(validation_indices), device,
                                       cfg.runtime.eval_batch_size)
    logits = predict_logits(model, loader, device, amp=amp, channels_last=cfg.runtime.channels_last, desc="validate")
    proba = distributed.gather_rows(data.heads.probabilities(logits).numpy().astype(np.float64),
                                    len(validation_indices))
    if not np.isfinite(proba).all():
        raise PipelineError(f"{label}: the model's outputs became NaN or infinite (the weights diverged): lower "
                            f"train.lr, set train.grad_clip (e.g. 1.0) or runtime.amp=off")
    return proba


def run_epoch(cfg: Config, build: FoldBuild, data: TrainingData, train_indices, fold: int, epoch: int,
              epochs: int, label: str, device, amp) -> float:
    """One training epoch, seeded from (seed, fold, epoch) so that a resumed run repeats the uninterrupted one."""
    epoch_seed = cfg.train.seed + 1000 * fold + epoch
    seed_everything(epoch_seed)
    frozen = epoch < cfg.train.freeze_epochs
    set_backbone_frozen(build.model, frozen)
    loader = fold_setup.make_train_loader(cfg, data, train_indices, device, seed=epoch_seed)
    return train_one_epoch(
        build.forward_model, loader, build.optimizer, build.compute_loss, device, state=build.state,
        scheduler=build.scheduler, per_update_scheduler=build.per_update, amp=amp, scaler=build.scaler,
        accumulate=cfg.train.accumulate, grad_clip=cfg.train.grad_clip, ema=build.ema, mixup=build.mixup,
        channels_last=cfg.runtime.channels_last, batch_augment=fold_setup.make_batch_augment(cfg, epoch_seed),
        frozen_norm=cfg.train.frozen_norm, desc=f"{label} epoch {epoch + 1}/{epochs}" + (" (frozen)" if frozen else ""))


def score_epoch(cfg: Config, build: FoldBuild, progress: FoldProgress, y_true, proba, epoch: int,
                train_loss: float, started: float) -> tuple[dict, bool]:
    """Score the epoch's validation, step an epoch scheduler, update the kept epoch (every epoch when
    ``train.keep_epoch`` is ``last``, else a better one); returns (record, improved)."""
    score = metrics.score(cfg.metric, y_true, proba)
    validation_loss = metrics.score("log_loss", y_true, proba)
    if build.scheduler is not None and not build.per_update:
        build.scheduler.step(epoch + 1, score if metrics.greater_is_better(cfg.metric) else -score)
    improved = (cfg.train.keep_epoch == "last" or progress.best_score is None
                or metrics.better(cfg.metric, score, progress.best_score))
    if improved:
        progress.best_score, progress.best_epoch, progress.stale, progress.best_proba = score, epoch, 0, proba
    else:
        progress.stale += 1
    record = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": validation_loss, cfg.metric: score,
              "lr": build.optimizer.param_groups[-1]["lr"], "seconds": round(time.perf_counter() - started, 2)}
    progress.history.append(record)
    return record, improved


# ---------------------------------------------------------------- the folds of one backbone

def cross_validate(cfg: Config, backbone: str, data: TrainingData, out_dir: Path | None, folds: list[int],
                   on_fold=None, on_epoch=None, epochs: int | None = None, train_subset: int | None = None,
                   open_loggers=None, devices: list[str] | None = None):
    """Train the given folds; returns their FoldResults. ``on_fold(index, score)`` follows each fold;
    ``open_loggers`` is train_fold's. ``devices``: several train the folds at once, one worker process each
    (``pipeline.training.devices``; not with callbacks, which live in this process); one or None: here, in turn."""
    fold_dirs = [out_dir / f"fold{fold}" if out_dir is not None else None for fold in folds]
    if devices and len(devices) > 1 and on_fold is None and on_epoch is None:
        jobs = [(cfg, backbone, fold, fold_dir, epochs, train_subset, open_loggers)
                for fold, fold_dir in zip(folds, fold_dirs)]
        return run_on_devices(train_fold_job, jobs, devices, f"[{backbone}] training")
    device = devices[0] if devices else None
    results = []
    for position, (fold, fold_dir) in enumerate(zip(folds, fold_dirs)):
        callback = (lambda epoch, score, fold=fold: on_epoch(fold, epoch, score)) if on_epoch else None
        result = train_fold(cfg, backbone, data, fold, fold_dir, callback, epochs, train_subset, open_loggers, device)
        results.append(result)
        if on_fold is not None:
            on_fold(position, result.best_score)
    return results


def train_fold_job(device: str, cfg: Config, backbone: str, fold: int, out_dir: Path | None, epochs: int | None,
                   train_subset: int | None, open_loggers) -> FoldResult:
    """One fold in a device worker: the training data read there (the image cache is memory-mapped, not sent)."""
    return train_fold(cfg, backbone, load_training_data(cfg), fold, out_dir, None, epochs, train_subset,
                      open_loggers, device)
