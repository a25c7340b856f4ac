"""Builders of one fold's training: loss, optimizer, scheduler, mixup, augmentation, loaders.

Each turns the config (and the fold's data) into the library object that does the work:
timm's optimizer and scheduler factories and ``Mixup``, torch's ``DataLoader`` with a
class-balancing ``WeightedRandomSampler``, the losses of ``pipeline.training.losses``. ``check_choices``
fails before any work on a name that none of their tables knows.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler

from pipeline.config import Config, Train
from pipeline.data.images import ImageDataset
from pipeline.errors import ConfigError
from pipeline.training import distributed
from pipeline.training.augment import BATCH_PRESETS, build_augment
from pipeline.training.losses import build_loss, class_weights, inverse_frequency
from pipeline.training.models import Heads, classifier_parameters


def loader_settings(cfg: Config, device: torch.device) -> dict:
    """Workers, pinned memory and persistent workers: in-process on the CPU (the model already uses
    every core and the augmentations are cheap uint8 ops), several workers feeding a GPU."""
    workers = cfg.runtime.num_workers
    if workers == "auto":
        workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    return {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0}


def make_loss(train: Train, heads: Heads, targets: np.ndarray):
    """One loss per head (the configured loss for submitted heads, cross-entropy for aux heads)."""
    losses = []
    for index, (_name, class_names) in enumerate(heads.heads + heads.aux):
        weight = None
        if train.class_weights:
            weight = class_weights(targets[:, index], len(class_names), train.balance_power)
        is_aux = index >= len(heads.heads)
        # timm's Mixup already smooths the soft targets it makes; smoothing them again would double it.
        smoothing = 0.0 if (train.mixup or train.cutmix) else train.label_smoothing
        losses.append(build_loss("ce" if is_aux else train.loss, len(class_names), label_smoothing=smoothing,
                                 focal_gamma=train.focal_gamma, focal_alpha=train.focal_alpha, weight=weight,
                                 ordinal_scale=train.ordinal_scale))
    head_count = len(heads.heads)

    def compute_loss(logits: torch.Tensor, batch_targets: torch.Tensor) -> torch.Tensor:
        parts = heads.split(logits)
        if batch_targets.dim() == 2 and batch_targets.dtype.is_floating_point:  # mixup's soft targets
            return losses[0](parts[0].float(), batch_targets)
        total = 0.0
        for index, (part, loss) in enumerate(zip(parts, losses)):
            scale = train.aux_weight if index >= head_count else 1.0
            total = total + scale * loss(part.float(), batch_targets[:, index])
        return total

    for loss in losses:
        loss.to("cpu")
    return compute_loss, losses


def make_optimizer(train: Train, model) -> torch.optim.Optimizer:
    """timm's optimizer factory on two groups: the classifier at train.lr, the backbone at lr x backbone_lr_mult;
    with ``train.layer_decay``, timm's layer-wise groups instead (each block's ``lr_scale`` the decay to the power of
    its depth below the classifier, times backbone_lr_mult below the classifier)."""
    from timm.optim import create_optimizer_v2, param_groups_layer_decay

    kwargs = {"momentum": train.momentum} if train.optimizer in ("sgd", "rmsprop") else {}
    if train.layer_decay:
        groups = param_groups_layer_decay(model.backbone, weight_decay=train.weight_decay,
                                          layer_decay=train.layer_decay)
        for group in groups:
            if group["lr_scale"] < 1.0:
                group["lr_scale"] *= train.backbone_lr_mult
            group["lr"] = train.lr * group["lr_scale"]
        return create_optimizer_v2(groups, opt=train.optimizer, lr=train.lr,
                                   weight_decay=train.weight_decay, **kwargs)
    head = classifier_parameters(model)
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    groups = [{"params": body, "lr": train.lr * train.backbone_lr_mult}, {"params": head, "lr": train.lr}]
    return create_optimizer_v2([g for g in groups if g["params"]], opt=train.optimizer, lr=train.lr,
                               weight_decay=train.weight_decay, **kwargs)


def make_scheduler(train: Train, optimizer, steps_per_epoch: int, epochs: int):
    """(scheduler, per_update): timm's cosine-with-warmup, step and plateau schedulers, torch's one-cycle."""
    from timm.scheduler import create_scheduler_v2

    name = train.scheduler
    if name == "none":
        return None, True
    if name == "onecycle":
        max_lr = [group["lr"] for group in optimizer.param_groups]
        pct_start = min(0.3, max(train.warmup_epochs / epochs, 0.05))
        total_steps = max(1, steps_per_epoch * epochs)
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps,
                                                   pct_start=pct_start), True
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=name, num_epochs=epochs, decay_epochs=train.step_size, decay_rate=train.step_gamma,
        warmup_epochs=train.warmup_epochs if name != "plateau" else 0,  # fractions count in updates
        warmup_lr=train.lr * 0.01, min_lr=train.lr * 0.01,
        patience_epochs=max(1, (train.patience or 4) // 2),
        step_on_epochs=name in ("step", "plateau"), updates_per_epoch=steps_per_epoch, warmup_prefix=True)
    return scheduler, name not in ("step", "plateau")


def make_mixup(train: Train, heads: Heads):
    if not (train.mixup or train.cutmix):
        return None
    if len(heads.heads) + len(heads.aux) > 1:
        raise ConfigError("train.mixup/train.cutmix work with a single head; set them to 0 for several heads")
    from timm.data import Mixup

    return Mixup(mixup_alpha=train.mixup, cutmix_alpha=train.cutmix, prob=train.mix_prob,
                 label_smoothing=train.label_smoothing, num_classes=len(heads.class_names))


def make_batch_augment(cfg: Config, seed: int):
    """The batch-level form of ``train.augment`` (applied by the training loop on the device), or None
    when the preset runs per image in the Dataset."""
    preset = BATCH_PRESETS.get(cfg.train.augment)
    return preset(cfg.data.size_hw, seed) if preset is not None else None


def make_train_loader(cfg: Config, data, indices: np.ndarray, device, seed: int) -> DataLoader:
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
    if distributed.active():  # under torchrun: each rank its share of the same batches
        batches = distributed.RankBatchSampler(sampler or RandomSampler(dataset, generator=generator),
                                               cfg.train.batch_size, drop_last, distributed.rank(),
                                               distributed.world_size())
        return DataLoader(dataset, batch_sampler=batches, generator=generator, **loader_settings(cfg, device))
    return DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=sampler is None, sampler=sampler,
                      generator=generator, drop_last=drop_last, **loader_settings(cfg, device))


def make_eval_loader(cfg: Config, images: np.ndarray, indices: np.ndarray, device, batch_size: int) -> DataLoader:
    settings = loader_settings(cfg, device)
    settings["persistent_workers"] = False
    return DataLoader(ImageDataset(images, indices), batch_size=batch_size, shuffle=False, **settings)


def timm_name(cfg: Config, backbone: str) -> str:
    """The timm model a backbone key stands for: its ``model`` override (on a config with the backbone's overrides
    applied, or on the whole config), else the key itself."""
    return cfg.train.model or (cfg.backbones.get(backbone) or {}).get("model") or backbone


def check_choices(cfg: Config) -> None:
    """Fail before any work on a backbone name that timm does not know (the config's own choices, such as the loss,
    the augmentation preset and the metric, are checked when it loads)."""
    from pipeline.training.models import check_backbone

    problems = []
    for name in cfg.backbones:
        try:
            check_backbone(timm_name(cfg, name))
        except ConfigError as error:
            problems.append(str(error))
    if problems:  # all of them at once, not one per run
        raise ConfigError(problems[0] if len(problems) == 1 else
                          f"{len(problems)} unknown names in the config:\n  " + "\n  ".join(problems))
