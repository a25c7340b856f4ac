"""Classification losses for multiclass logits (N x C).

Every loss returned by :func:`build_loss` accepts two kinds of target:

* integer class indices of shape N (the ordinary case), and
* soft targets of shape N x C (float rows summing to 1), as produced by
  timm's ``Mixup``/``CutMix``.

The focal loss is written so that with ``gamma=0`` and no ``alpha`` it is
exactly ``nn.CrossEntropyLoss`` (same label smoothing, same class weights,
same normalisation), which keeps ``ce`` and ``focal`` comparable in logs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _target_distribution(
    targets: torch.Tensor, n_classes: int, label_smoothing: float, dtype: torch.dtype
) -> torch.Tensor:
    """Turn integer or soft targets into an N x C distribution, smoothed like torch's CE."""
    if targets.ndim == 1 and not targets.is_floating_point():
        distribution = F.one_hot(targets.long(), n_classes).to(dtype)
    elif targets.ndim == 2 and targets.shape[1] == n_classes:
        distribution = targets.to(dtype)
    else:
        raise ValueError(
            f"targets must be integer class indices of shape (N,) or soft targets of "
            f"shape (N, {n_classes}); got dtype {targets.dtype} shape {tuple(targets.shape)}"
        )
    if label_smoothing > 0:
        # Same formula nn.CrossEntropyLoss uses, for hard and soft targets alike.
        distribution = distribution * (1.0 - label_smoothing) + label_smoothing / n_classes
    return distribution


class FocalLoss(nn.Module):
    """Multiclass (softmax) focal loss with optional per-class alpha, weights and label smoothing.

    Per sample: ``-sum_c alpha_c * weight_c * q_c * (1 - p_c)^gamma * log p_c`` where ``q`` is the
    (smoothed) target distribution. Reduction is the mean, normalised exactly like
    ``nn.CrossEntropyLoss``: by ``sum_i weight[y_i]`` for integer targets and by N for soft
    targets, so ``gamma=0, alpha=None`` reproduces cross-entropy.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)
        # A float alpha is one factor for every class: in the softmax form there is no
        # positive/negative split, so it only rescales the loss (kept for config compatibility).
        if alpha is not None:
            alpha = torch.as_tensor(alpha, dtype=torch.float32)
            if alpha.ndim > 1:
                raise ValueError(f"alpha must be a float or a 1-D per-class sequence, got shape {tuple(alpha.shape)}")
        # Buffers follow the module to the device with .to(device).
        self.register_buffer("alpha", alpha)
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean focal loss of logits N x C against integer (N) or soft (N x C) targets."""
        n_classes = logits.shape[1]
        log_probabilities = F.log_softmax(logits, dim=1)
        distribution = _target_distribution(targets, n_classes, self.label_smoothing, log_probabilities.dtype)
        per_class = -distribution * log_probabilities
        if self.gamma != 0:
            # The clamp keeps the gradient of (1 - p)^gamma finite for gamma < 1 when p rounds to 1.
            one_minus_p = (1.0 - log_probabilities.exp()).clamp(min=1e-12)
            per_class = per_class * one_minus_p.pow(self.gamma)
        if self.alpha is not None:
            self._check_length(self.alpha, n_classes, "alpha")
            per_class = per_class * self.alpha.to(per_class.dtype)
        if self.weight is not None:
            self._check_length(self.weight, n_classes, "weight")
            per_class = per_class * self.weight.to(per_class.dtype)
        total = per_class.sum()
        hard_targets = targets.ndim == 1
        if self.weight is not None and hard_targets:
            # Weighted mean as in nn.CrossEntropyLoss: divide by the weights of the true classes.
            return total / self.weight.to(total.dtype)[targets.long()].sum()
        return total / logits.shape[0]

    @staticmethod
    def _check_length(values: torch.Tensor, n_classes: int, name: str) -> None:
        if values.ndim == 1 and values.numel() != n_classes:
            raise ValueError(f"{name} has {values.numel()} entries but the logits have {n_classes} classes")


class F1Loss(nn.Module):
    """Differentiable soft macro-F1 loss: ``1 - mean_c F1_c`` from softmax probabilities.

    True/false positives and false negatives are summed over the batch with probabilities in
    place of hard predictions. The mean runs over the classes present in the batch's targets:
    an absent class has no true positives, so its soft F1 would be a constant 0 that only
    shifts the value (a perfect batch would not score ~0). Predicting an absent class is still
    penalised, as probability missing from the true class (a false negative there).
    """

    def __init__(self, epsilon: float = 1e-7) -> None:
        super().__init__()
        self.epsilon = float(epsilon)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Soft macro-F1 loss of logits N x C against integer (N) or soft (N x C) targets."""
        probabilities = F.softmax(logits, dim=1)
        distribution = _target_distribution(targets, logits.shape[1], 0.0, probabilities.dtype)
        true_positives = (probabilities * distribution).sum(dim=0)
        false_positives = (probabilities * (1.0 - distribution)).sum(dim=0)
        false_negatives = ((1.0 - probabilities) * distribution).sum(dim=0)
        f1 = 2 * true_positives / (2 * true_positives + false_positives + false_negatives + self.epsilon)
        present = distribution.sum(dim=0) > 0
        return 1.0 - f1[present].mean()


def ordinal_kernel(n_classes: int, scale: float) -> torch.Tensor:
    """Soft ordinal labels (SORD, Diaz and Marathe, CVPR 2019): row ``y`` is the target distribution of class ``y``,
    ``softmax_c(-scale * (c - y)^2)``, so a class shares its target with its neighbours in class order and less with
    classes further away; ``scale`` -> infinity gives one-hot rows. A C x C row-stochastic float32 matrix."""
    ranks = torch.arange(n_classes, dtype=torch.float64)
    return torch.softmax(-scale * (ranks[None, :] - ranks[:, None]) ** 2, dim=1).float()


class OrdinalCrossEntropy(nn.Module):
    """Cross-entropy against soft ordinal targets: the (smoothed) target distribution times :func:`ordinal_kernel`.

    For classes that are grades of one quantity (defect levels, severity, age bands), so that calling a class its
    neighbour costs less than calling it a distant one. Class weights weigh each class's term, as torch's
    cross-entropy does for soft targets (mean over the batch)."""

    def __init__(self, n_classes: int, scale: float, weight: torch.Tensor | None = None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"the ordinal scale must be > 0, got {scale}")
        self.label_smoothing = float(label_smoothing)
        self.register_buffer("kernel", ordinal_kernel(n_classes, scale))
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean ordinal cross-entropy of logits N x C against integer (N) or soft (N x C) targets."""
        distribution = _target_distribution(targets, logits.shape[1], self.label_smoothing, self.kernel.dtype)
        return F.cross_entropy(logits.float(), distribution @ self.kernel, weight=self.weight)


class SumOfLosses(nn.Module):
    """Sum of several losses that share the same (logits, targets) call."""

    def __init__(self, *losses: nn.Module) -> None:
        super().__init__()
        self.losses = nn.ModuleList(losses)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Sum of every loss on the same logits and targets."""
        return sum(loss(logits, targets) for loss in self.losses)


def inverse_frequency(counts: np.ndarray, power: float) -> np.ndarray:
    """Per-class ``count^-power`` (float64), 0 for a class with no samples: the balancing that
    ``train.balance_power`` sets for both the class weights and the oversampler."""
    counts = np.asarray(counts, dtype=np.float64)
    weights = np.zeros_like(counts)
    present = counts > 0
    weights[present] = counts[present] ** -power
    return weights


def class_weights(labels: np.ndarray, n_classes: int, power: float = 1.0) -> torch.Tensor:
    """Inverse-frequency class weights ``count^-power``, scaled so ``mean_i w[y_i] == 1``.

    The scaling keeps a weighted loss at the same magnitude as the unweighted one, so the
    learning rate need not change when weighting is switched on. A class with no samples gets
    weight 0 instead of infinity: it never occurs as a target, and 0 keeps the loss finite in
    the label-smoothing / soft-target terms where every class's weight is used.
    """
    labels = np.asarray(labels).reshape(-1)
    if labels.size == 0:
        raise ValueError("class_weights needs at least one label")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"labels must lie in [0, {n_classes}), got range [{labels.min()}, {labels.max()}]")
    counts = np.bincount(labels.astype(np.int64), minlength=n_classes).astype(np.float64)
    weights = inverse_frequency(counts, power)
    weights *= labels.size / (counts * weights).sum()
    return torch.tensor(weights, dtype=torch.float32)


def _build_cross_entropy(n_classes: int, label_smoothing: float, focal_gamma: float, focal_alpha, weight,
                         ordinal_scale: float | None) -> nn.Module:
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)


def _build_focal(n_classes: int, label_smoothing: float, focal_gamma: float, focal_alpha, weight,
                 ordinal_scale: float | None) -> nn.Module:
    return FocalLoss(gamma=focal_gamma, alpha=focal_alpha, weight=weight, label_smoothing=label_smoothing)


def _build_f1(n_classes: int, label_smoothing: float, focal_gamma: float, focal_alpha, weight,
              ordinal_scale: float | None) -> nn.Module:
    # Smoothing and class weights do not apply: macro-F1 already weighs every class equally.
    return F1Loss()


def _build_cross_entropy_plus_f1(n_classes: int, label_smoothing: float, focal_gamma: float, focal_alpha,
                                 weight, ordinal_scale: float | None) -> nn.Module:
    return SumOfLosses(_build_cross_entropy(n_classes, label_smoothing, focal_gamma, focal_alpha, weight,
                                            ordinal_scale), F1Loss())


def _build_ordinal(n_classes: int, label_smoothing: float, focal_gamma: float, focal_alpha, weight,
                   ordinal_scale: float | None) -> nn.Module:
    if ordinal_scale is None:
        raise ValueError("the ordinal loss needs its ordinal_scale")
    return OrdinalCrossEntropy(n_classes, ordinal_scale, weight=weight, label_smoothing=label_smoothing)


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "ce": _build_cross_entropy,
    "focal": _build_focal,
    "f1": _build_f1,
    "ce+f1": _build_cross_entropy_plus_f1,
    "ordinal": _build_ordinal,
}


def build_loss(
    name: str,
    n_classes: int,
    label_smoothing: float = 0.0,
    focal_gamma: float = 2.0,
    focal_alpha: float | Sequence[float] | None = None,
    weight: torch.Tensor | None = None,
    ordinal_scale: float | None = None,
) -> nn.Module:
    """Build the loss called ``name`` (one of ``LOSSES``); it accepts integer and soft targets."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(sorted(LOSSES))}")
    if weight is not None:
        weight = torch.as_tensor(weight, dtype=torch.float32)
        if weight.shape != (n_classes,):
            raise ValueError(f"weight must have shape ({n_classes},), got {tuple(weight.shape)}")
    if focal_alpha is not None and not isinstance(focal_alpha, (int, float)) and len(focal_alpha) != n_classes:
        raise ValueError(f"focal_alpha must be a float or have {n_classes} entries, got {len(focal_alpha)}")
    return LOSSES[name](n_classes, label_smoothing, focal_gamma, focal_alpha, weight, ordinal_scale)
