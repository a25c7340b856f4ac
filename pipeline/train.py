"""Stage train: k-fold training of each timm backbone, with out-of-fold probabilities.

Reads:  ``paths.cache`` (images, classes, mean/std), ``paths.folds``, and
        ``paths.tuning``/<backbone>/best_params.yaml when ``train.use_tuned`` and it exists.
Writes: ``paths.models``/<backbone>/fold<k>/best.pt and last.pt (weights, the resolved
        config, the heads and class names: enough to rebuild the model alone),
        ``paths.oof``/<backbone>.parquet (id, fold, one probability column per class; every
        training id exactly once), ``paths.metrics``/<backbone>.json (per fold and
        mean/std), ``paths.plots``/<backbone>/ (DVCLive per-epoch curves per fold and a
        confusion-matrix PNG).

A fold that finished with the same settings is not trained again; a fold killed mid-way
continues from last.pt (model, optimizer, scheduler, EMA, epoch, RNG); changed settings
start the fold afresh. Each epoch is seeded from (seed, fold, epoch), so the same config
gives the same OOF on the CPU, resumed or not.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from pydantic import ValidationError
from torch.utils.data import DataLoader, WeightedRandomSampler

from pipeline import cli, metrics
from pipeline.artifacts import atomic_path, probability_table, save_figure, write_json, write_parquet
from pipeline.augment import BATCH_PRESETS, build_augment
from pipeline.config import Config
from pipeline.data import Cache, ImageDataset, encode_labels, slug
from pipeline.engine import StepState, autocast_dtype, predict_logits, resolve_device, seed_everything, train_one_epoch
from pipeline.errors import ConfigError, DataError, PipelineError
from pipeline.folds import read_folds
from pipeline.losses import build_loss, class_weights, inverse_frequency
from pipeline.models import Heads, classifier_parameters, create_model, set_backbone_frozen

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


def load_training_data(cfg: Config) -> TrainingData:
    """Join the cache with folds.csv and encode every head's labels."""
    cache = Cache.open(cfg)
    table = cache.table("train")
    folds = read_folds(cfg)
    if set(folds["id"].astype(str)) != set(table["id"].astype(str)):
        raise DataError(f"{cfg.path('folds')} and the image cache hold different ids: re-run folds after prepare")
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
                        labels=labels, heads=heads, mean=cache.mean, std=cache.std)


def tuned_config(cfg: Config, backbone: str) -> Config:
    """The config with this backbone's own overrides (``backbones.<name>``), then its tuned parameters
    when tuning found some and use_tuned is on."""
    cfg = cfg.for_backbone(backbone)
    path = cfg.path("tuning") / slug(backbone) / "best_params.yaml"
    if not cfg.train.use_tuned or not path.exists():
        return cfg
    fix = "delete it and re-run tune, or set train.use_tuned=false"
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML ({error}); {fix}") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path} must map train keys to values; {fix}")
    data = cfg.model_dump()
    unknown = [k for k in params if k not in data["train"]]
    if unknown:
        raise ConfigError(f"{path} names unknown train key(s) {unknown}; {fix}")
    data["train"].update(params)
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})"
                             for e in error.errors())
        raise ConfigError(f"{path} sets invalid values: {problems}; {fix}") from None


def settings_key(cfg: Config, backbone: str, data: TrainingData, fold: int) -> str:
    """A digest of everything a fold's result depends on; a change starts the fold afresh."""
    relevant = {"backbone": backbone, "fold": fold, "train": cfg.train.model_dump(exclude={"folds", "num_workers"}),
                "data": [list(cfg.data.size_hw), cfg.data.channels, cfg.data.aux_cols],
                "heads": data.heads.to_dict()}
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode())
    # The ids as text: an object array's bytes are pointers, different in every process, which
    # made every new process see "changed settings" and never resume or skip a finished fold.
    digest.update("\0".join(map(str, data.ids)).encode())
    digest.update(data.folds.tobytes())
    digest.update(data.targets.tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- building blocks

def loader_settings(cfg: Config, device: torch.device) -> dict:
    """Workers, pinned memory and persistent workers: in-process on the CPU (the model already uses
    every core and the augmentations are cheap uint8 ops), several workers feeding a GPU."""
    workers = cfg.train.num_workers
    if workers == "auto":
        workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    return {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0}


def make_loss(cfg: Config, heads: Heads, targets: np.ndarray):
    """One loss per head (the configured loss for submitted heads, cross-entropy for aux heads)."""
    losses = []
    for index, (_name, class_names) in enumerate(heads.heads + heads.aux):
        weight = None
        if cfg.train.class_weights:
            weight = class_weights(targets[:, index], len(class_names), cfg.train.balance_power)
        is_aux = index >= len(heads.heads)
        # timm's Mixup already smooths the soft targets it makes; smoothing them again would double it.
        smoothing = 0.0 if (cfg.train.mixup or cfg.train.cutmix) else cfg.train.label_smoothing
        losses.append(build_loss("ce" if is_aux else cfg.train.loss, len(class_names), label_smoothing=smoothing,
                                 focal_gamma=cfg.train.focal_gamma, focal_alpha=cfg.train.focal_alpha, weight=weight))
    head_count = len(heads.heads)

    def compute_loss(logits: torch.Tensor, batch_targets: torch.Tensor) -> torch.Tensor:
        parts = heads.split(logits)
        if batch_targets.dim() == 2 and batch_targets.dtype.is_floating_point:  # mixup's soft targets
            return losses[0](parts[0].float(), batch_targets)
        total = 0.0
        for index, (part, loss) in enumerate(zip(parts, losses)):
            scale = cfg.train.aux_weight if index >= head_count else 1.0
            total = total + scale * loss(part.float(), batch_targets[:, index])
        return total

    for loss in losses:
        loss.to("cpu")
    return compute_loss, losses


def make_optimizer(cfg: Config, model) -> torch.optim.Optimizer:
    """timm's optimizer factory on two groups: the classifier at train.lr, the backbone at lr x backbone_lr_mult."""
    from timm.optim import create_optimizer_v2

    head = classifier_parameters(model)
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    groups = [{"params": body, "lr": cfg.train.lr * cfg.train.backbone_lr_mult}, {"params": head, "lr": cfg.train.lr}]
    kwargs = {"momentum": cfg.train.momentum} if cfg.train.optimizer in ("sgd", "rmsprop") else {}
    return create_optimizer_v2([g for g in groups if g["params"]], opt=cfg.train.optimizer, lr=cfg.train.lr,
                               weight_decay=cfg.train.weight_decay, **kwargs)


def make_scheduler(cfg: Config, optimizer, steps_per_epoch: int, epochs: int):
    """(scheduler, per_update): timm's cosine-with-warmup, step and plateau schedulers, torch's one-cycle."""
    from timm.scheduler import create_scheduler_v2

    name = cfg.train.scheduler
    if name == "none":
        return None, True
    if name == "onecycle":
        max_lr = [group["lr"] for group in optimizer.param_groups]
        pct_start = min(0.3, max(cfg.train.warmup_epochs / epochs, 0.05))
        total_steps = max(1, steps_per_epoch * epochs)
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps,
                                                   pct_start=pct_start), True
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=name, num_epochs=epochs, decay_epochs=cfg.train.step_size, decay_rate=cfg.train.step_gamma,
        warmup_epochs=int(round(cfg.train.warmup_epochs)) if name != "plateau" else 0,
        warmup_lr=cfg.train.lr * 0.01, min_lr=cfg.train.lr * 0.01,
        patience_epochs=max(1, (cfg.train.patience or 4) // 2),
        step_on_epochs=name in ("step", "plateau"), updates_per_epoch=steps_per_epoch, warmup_prefix=True)
    return scheduler, name not in ("step", "plateau")


def make_mixup(cfg: Config, heads: Heads):
    if not (cfg.train.mixup or cfg.train.cutmix):
        return None
    if len(heads.heads) + len(heads.aux) > 1:
        raise ConfigError("train.mixup/train.cutmix work with a single head; set them to 0 for several heads")
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.train.mixup, cutmix_alpha=cfg.train.cutmix, prob=cfg.train.mix_prob,
                 label_smoothing=cfg.train.label_smoothing, num_classes=len(heads.class_names))


def make_batch_augment(cfg: Config, seed: int):
    """The batch-level form of ``train.augment`` (applied by the training loop on the device), or None
    when the preset runs per image in the Dataset."""
    preset = BATCH_PRESETS.get(cfg.train.augment)
    return preset(cfg.data.size_hw, seed) if preset is not None else None


def make_train_loader(cfg: Config, data: TrainingData, indices: np.ndarray, device, seed: int) -> DataLoader:
    augment = None
    if cfg.train.augment not in BATCH_PRESETS:
        augment = build_augment(cfg.train.augment, cfg.data.size_hw, cfg.data.channels, seed=seed)
    dataset = ImageDataset(data.images, indices, data.targets[indices], augment)
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if cfg.train.oversample:
        # A sample's weight is its class's frequency in this fold ** -balance_power: 1 draws every
        # class equally often, 0.5 (square root) halfway between that and the natural frequencies.
        counts = np.bincount(data.labels[indices], minlength=len(data.heads.class_names))
        weights = inverse_frequency(counts, cfg.train.balance_power)[data.labels[indices]]
        sampler = WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), len(indices),
                                        replacement=True, generator=generator)
    drop_last = len(indices) > cfg.train.batch_size  # a lone 1-image batch breaks batch norm
    return DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=sampler is None, sampler=sampler,
                      generator=generator, drop_last=drop_last, **loader_settings(cfg, device))


def make_eval_loader(cfg: Config, images: np.ndarray, indices: np.ndarray, device, batch_size: int) -> DataLoader:
    settings = loader_settings(cfg, device)
    settings["persistent_workers"] = False
    return DataLoader(ImageDataset(images, indices), batch_size=batch_size, shuffle=False, **settings)


# ---------------------------------------------------------------- one fold

@dataclass
class FoldResult:
    fold: int
    best_score: float
    best_epoch: int
    validation_indices: np.ndarray
    validation_proba: np.ndarray
    history: list[dict]


def _save_checkpoint(path: Path, payload: dict) -> None:
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


def train_fold(cfg: Config, backbone: str, data: TrainingData, fold: int, out_dir: Path | None,
               on_epoch=None, epochs: int | None = None, train_subset: int | None = None) -> FoldResult:
    """Train one fold; returns the best epoch's validation probabilities.

    ``out_dir`` (None: keep nothing on disk, as tuning trials do) receives best.pt,
    last.pt and done.json. ``on_epoch(epoch, score)`` is called after every validation,
    which is how Optuna prunes; it may raise to stop the fold.
    """
    epochs = epochs or cfg.train.epochs
    device = resolve_device(cfg.train.device)
    amp = autocast_dtype(cfg.train.amp, device)
    train_indices = np.flatnonzero(data.folds != fold)
    validation_indices = np.flatnonzero(data.folds == fold)
    if train_subset and train_subset < len(train_indices):
        rng = np.random.default_rng(cfg.train.seed + fold)
        train_indices = np.sort(rng.choice(train_indices, train_subset, replace=False))
    if len(validation_indices) == 0:
        raise DataError(f"fold {fold} has no validation images in {cfg.path('folds')}")
    key = settings_key(cfg, backbone, data, fold)
    if out_dir is not None:
        done = out_dir / "done.json"
        if done.exists() and json.loads(done.read_text()).get("key") == key and (out_dir / "validation.npy").exists():
            summary = json.loads(done.read_text())
            print(f"[{backbone}] fold {fold}: already trained (best {cfg.train.metric} {summary['best_score']:.4f} "
                  f"at epoch {summary['best_epoch']}), skipped", file=sys.stderr)
            return FoldResult(fold, summary["best_score"], summary["best_epoch"], validation_indices,
                              np.load(out_dir / "validation.npy"), summary["history"])

    seed_everything(cfg.train.seed + 1000 * fold)
    model = create_model(backbone, data.heads, cfg.data.channels, data.mean, data.std, cfg.train.pretrained,
                         cfg.train.pretrained_file, cfg.train.drop_rate, cfg.train.drop_path_rate).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    compute_loss, losses = make_loss(cfg, data.heads, data.targets[train_indices])
    for loss in losses:
        loss.to(device)
    optimizer = make_optimizer(cfg, model)
    probe_loader = make_train_loader(cfg, data, train_indices, device, seed=0)
    steps_per_epoch = max(1, -(-len(probe_loader) // cfg.train.accumulate))
    scheduler, per_update = make_scheduler(cfg, optimizer, steps_per_epoch, epochs)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    ema = None
    if cfg.train.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.train.ema_decay)
    mixup = make_mixup(cfg, data.heads)
    forward_model = torch.compile(model) if cfg.train.compile else model
    state = StepState()
    start_epoch, best_score, best_epoch, stale, history = 0, None, -1, 0, []
    best_proba = None

    last_path = out_dir / "last.pt" if out_dir is not None else None
    if last_path is not None and last_path.exists():
        checkpoint = load_checkpoint(last_path)
        if checkpoint.get("key") == key:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            if scheduler is not None and checkpoint.get("scheduler") is not None:
                scheduler.load_state_dict(checkpoint["scheduler"])
            if ema is not None and checkpoint.get("ema") is not None:
                ema.load_state_dict(checkpoint["ema"])
            if scaler is not None and checkpoint.get("scaler") is not None:
                scaler.load_state_dict(checkpoint["scaler"])
            state.updates = checkpoint["updates"]
            start_epoch = checkpoint["epoch"] + 1
            best_score, best_epoch, stale = checkpoint["best_score"], checkpoint["best_epoch"], checkpoint["stale"]
            history = checkpoint["history"]
            best_proba = checkpoint.get("best_proba")
            print(f"[{backbone}] fold {fold}: resuming from {last_path} at epoch {start_epoch + 1}/{epochs}",
                  file=sys.stderr)
        else:
            print(f"[{backbone}] fold {fold}: settings changed since {last_path}; starting afresh", file=sys.stderr)
    live = _live(cfg, backbone, fold, resume=start_epoch > 0) if out_dir is not None else None
    eval_loader = make_eval_loader(cfg, data.images, validation_indices, device, cfg.infer.batch_size)
    y_true = data.labels[validation_indices]

    for epoch in range(start_epoch, epochs):
        started = time.perf_counter()
        # Seeding each epoch from (seed, fold, epoch) makes a resumed run repeat the uninterrupted one.
        epoch_seed = cfg.train.seed + 1000 * fold + epoch
        seed_everything(epoch_seed)
        frozen = epoch < cfg.train.freeze_epochs
        set_backbone_frozen(model, frozen)
        loader = make_train_loader(cfg, data, train_indices, device, seed=epoch_seed)
        train_loss = train_one_epoch(
            forward_model, loader, optimizer, compute_loss, device, state=state, scheduler=scheduler,
            per_update_scheduler=per_update, amp=amp, scaler=scaler, accumulate=cfg.train.accumulate,
            grad_clip=cfg.train.grad_clip, ema=ema, mixup=mixup, channels_last=cfg.train.channels_last,
            batch_augment=make_batch_augment(cfg, epoch_seed),
            desc=f"[{backbone}] fold {fold} epoch {epoch + 1}/{epochs}" + (" (frozen)" if frozen else ""))
        evaluated = ema.module if ema is not None else model
        logits = predict_logits(evaluated, eval_loader, device, amp=amp, channels_last=cfg.train.channels_last,
                                desc="validate")
        proba = data.heads.probabilities(logits).numpy().astype(np.float64)
        if not np.isfinite(proba).all():
            raise PipelineError(f"[{backbone}] fold {fold} epoch {epoch + 1}: the model's outputs became NaN or "
                                f"infinite (the weights diverged): lower train.lr, set train.grad_clip (e.g. 1.0) "
                                f"or train.amp=off")
        score = metrics.score(cfg.train.metric, y_true, proba)
        validation_loss = metrics.score("log_loss", y_true, proba)
        if scheduler is not None and not per_update:
            scheduler.step(epoch + 1, score if metrics.greater_is_better(cfg.train.metric) else -score)
        improved = best_score is None or metrics.better(cfg.train.metric, score, best_score)
        if improved:
            best_score, best_epoch, stale, best_proba = score, epoch, 0, proba
        else:
            stale += 1
        record = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": validation_loss,
                  cfg.train.metric: score, "lr": optimizer.param_groups[-1]["lr"],
                  "seconds": round(time.perf_counter() - started, 2)}
        history.append(record)
        print(f"[{backbone}] fold {fold} epoch {epoch + 1}/{epochs}: train_loss {train_loss:.4f} "
              f"val_loss {validation_loss:.4f} {cfg.train.metric} {score:.4f}{' *' if improved else ''} "
              f"({record['seconds']}s)", file=sys.stderr)
        if live is not None:
            for name in ("train_loss", "val_loss", cfg.train.metric, "lr"):
                live.log_metric(name, record[name])
            live.next_step()
        if out_dir is not None:
            payload = {"model": evaluated.state_dict(), "backbone": backbone, "heads": data.heads.to_dict(),
                       "in_chans": cfg.data.channels, "mean": data.mean, "std": data.std,
                       "config": cfg.model_dump(mode="json"), "epoch": epoch, "score": score, "key": key}
            if improved:
                _save_checkpoint(out_dir / "best.pt", payload)
            _save_checkpoint(last_path, {
                **payload, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "ema": ema.state_dict() if ema is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None, "updates": state.updates,
                "best_score": best_score, "best_epoch": best_epoch, "stale": stale, "history": history,
                "best_proba": best_proba})
        if on_epoch is not None:
            on_epoch(epoch, score)
        if cfg.train.patience and stale >= cfg.train.patience:
            print(f"[{backbone}] fold {fold}: no improvement for {stale} epochs, stopping early", file=sys.stderr)
            break
    if live is not None:
        live.end()
    if out_dir is not None:
        with atomic_path(out_dir / "validation.npy") as temporary, open(temporary, "wb") as handle:
            np.save(handle, best_proba)
        write_json(out_dir / "done.json", {"key": key, "best_score": best_score, "best_epoch": best_epoch,
                                           "history": history})
    return FoldResult(fold, best_score, best_epoch, validation_indices, best_proba, history)


def _live(cfg: Config, backbone: str, fold: int, resume: bool):
    """A DVCLive logger for a fold's per-epoch curves (plots only: no DVC experiment is created from here)."""
    from dvclive import Live

    folder = cfg.path("plots") / "train" / slug(backbone) / f"fold{fold}"
    if not resume:
        shutil.rmtree(folder, ignore_errors=True)
    try:
        return Live(dir=str(folder), resume=resume, save_dvc_exp=False, dvcyaml=None, report=None)
    except Exception as error:  # dvclive probes git and DVC; a repo it cannot read must not stop training
        print(f"[{backbone}] fold {fold}: per-epoch curves off, DVCLive failed: {error}", file=sys.stderr)
        return None


# ---------------------------------------------------------------- one backbone

def cross_validate(cfg: Config, backbone: str, data: TrainingData, out_dir: Path | None, folds: list[int],
                   on_fold=None, on_epoch=None, epochs: int | None = None, train_subset: int | None = None):
    """Train the given folds; returns their FoldResults. ``on_fold(index, score)`` follows each fold."""
    results = []
    for position, fold in enumerate(folds):
        callback = (lambda epoch, score, fold=fold: on_epoch(fold, epoch, score)) if on_epoch else None
        fold_dir = out_dir / f"fold{fold}" if out_dir is not None else None
        result = train_fold(cfg, backbone, data, fold, fold_dir, callback, epochs, train_subset)
        results.append(result)
        if on_fold is not None:
            on_fold(position, result.best_score)
    return results


def confusion_figure(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(4.0, 0.45 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=range(len(class_names)),
                                            display_labels=class_names, ax=axis, colorbar=False,
                                            xticks_rotation=45 if len(class_names) > 6 else 0)
    axis.set_title(title)
    return figure


def train_backbone(cfg: Config, backbone: str) -> dict:
    cfg = tuned_config(cfg, backbone)
    data = load_training_data(cfg)
    all_folds = sorted(np.unique(data.folds).tolist())
    folds = cfg.train.folds if cfg.train.folds is not None else all_folds
    bad = [f for f in folds if f not in all_folds]
    if bad:
        raise ConfigError(f"train.folds {bad} are not folds of {cfg.path('folds')} (it has {all_folds})")
    model_dir = cfg.path("models") / slug(backbone)
    print(f"[{backbone}] training {len(folds)} fold(s), {cfg.train.epochs} epochs, "
          f"{len(data.ids)} images, classes {data.heads.class_names}", file=sys.stderr)
    results = cross_validate(cfg, backbone, data, model_dir, folds)
    proba = np.zeros((len(data.ids), len(data.heads.class_names)))
    covered = np.zeros(len(data.ids), dtype=bool)
    for result in results:
        proba[result.validation_indices] = result.validation_proba
        covered[result.validation_indices] = True
    ids, fold_column, proba, y_true = data.ids[covered], data.folds[covered], proba[covered], data.labels[covered]
    write_parquet(cfg.path("oof") / f"{slug(backbone)}.parquet",
                  probability_table(ids, proba, data.heads.class_names, fold_column))
    per_fold = [{"fold": r.fold, cfg.train.metric: r.best_score, "best_epoch": r.best_epoch + 1,
                 **metrics.summary(data.labels[r.validation_indices], r.validation_proba, data.heads.class_names)}
                for r in results]
    fold_scores = np.array([r.best_score for r in results])
    report = {"backbone": backbone, "metric": cfg.train.metric,
              "cv": float(fold_scores.mean()), "cv_std": float(fold_scores.std()),
              "oof": metrics.summary(y_true, proba, data.heads.class_names) | {
                  cfg.train.metric: metrics.score(cfg.train.metric, y_true, proba)},
              "folds": per_fold}
    write_json(cfg.path("metrics") / f"{slug(backbone)}.json", report)
    save_figure(cfg.path("plots") / f"confusion_{slug(backbone)}.png",
                confusion_figure(y_true, proba.argmax(1), data.heads.class_names,
                                 f"{backbone} OOF ({cfg.train.metric} {report['cv']:.3f})"))
    print(f"[{backbone}] CV {cfg.train.metric} {report['cv']:.4f} ± {report['cv_std']:.4f}; "
          f"OOF accuracy {report['oof']['accuracy']:.4f}, log loss {report['oof']['log_loss']:.4f}", file=sys.stderr)
    return report


def check_choices(cfg: Config) -> None:
    """Fail before any work on a name that no table knows, listing the valid ones."""
    from pipeline.augment import PRESETS
    from pipeline.losses import LOSSES
    from pipeline.models import check_backbone

    problems = [f"{key} {value!r} is unknown; valid: {', '.join(valid)}"
                for key, value, valid in (("train.metric", cfg.train.metric, metrics.METRICS),
                                          ("train.loss", cfg.train.loss, LOSSES),
                                          ("train.augment", cfg.train.augment, PRESETS))
                if value not in valid]
    for name in cfg.backbones:
        try:
            check_backbone(name)
        except ConfigError as error:
            problems.append(str(error))
    if problems:  # all of them at once, not one per run
        raise ConfigError(problems[0] if len(problems) == 1 else
                          f"{len(problems)} unknown names in the config:\n  " + "\n  ".join(problems))


def main(cfg: Config, backbone: str | None = None) -> dict:
    names = [backbone] if backbone else cfg.backbones
    if backbone and backbone not in cfg.backbones:
        raise ConfigError(f"--backbone {backbone} is not in backbones {list(cfg.backbones)}")
    check_choices(cfg)
    return {name: train_backbone(cfg, name) for name in names}


if __name__ == "__main__":
    cli.run(main, "k-fold training of timm backbones.", backbone_option=True)
