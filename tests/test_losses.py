"""Tests for pipeline.training.losses: values checked against torch and against numbers worked by hand."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.training.losses import LOSSES, F1Loss, FocalLoss, build_loss, class_weights, ordinal_kernel


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_focal_with_gamma_zero_equals_cross_entropy(seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(16, 5, generator=generator) * 3
    targets = torch.randint(0, 5, (16,), generator=generator)
    focal = FocalLoss(gamma=0.0)(logits, targets)
    cross_entropy = nn.CrossEntropyLoss()(logits, targets)
    assert focal.item() == pytest.approx(cross_entropy.item(), abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("soft", [False, True])
def test_focal_with_gamma_zero_matches_weighted_smoothed_cross_entropy(seed, soft):
    # The normalisation of weighted / smoothed CE differs between hard and soft targets in torch;
    # focal must follow it in both cases.
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(12, 4, generator=generator)
    if soft:
        targets = torch.softmax(torch.randn(12, 4, generator=generator), dim=1)
    else:
        targets = torch.randint(0, 4, (12,), generator=generator)
    weight = torch.tensor([0.5, 2.0, 1.0, 3.0])
    focal = FocalLoss(gamma=0.0, weight=weight, label_smoothing=0.1)(logits, targets)
    cross_entropy = nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1)(logits, targets)
    assert focal.item() == pytest.approx(cross_entropy.item(), abs=1e-6)


def test_focal_hand_computed_and_smaller_than_cross_entropy_when_confident():
    # One example, logits [2, 0] and true class 0: p = e^2 / (e^2 + e^0) = 0.880797.
    logits = torch.tensor([[2.0, 0.0]])
    targets = torch.tensor([0])
    p_true = math.exp(2) / (math.exp(2) + 1)
    assert p_true == pytest.approx(0.880797, abs=1e-6)
    # Focal, gamma 2: -(1 - 0.880797)^2 * log(0.880797) = -(0.119203^2) * (-0.126928) = 0.0018036.
    expected_focal = -((1 - p_true) ** 2) * math.log(p_true)
    assert expected_focal == pytest.approx(0.0018036, abs=1e-6)
    focal = FocalLoss(gamma=2.0)(logits, targets).item()
    cross_entropy = nn.CrossEntropyLoss()(logits, targets).item()
    assert focal == pytest.approx(expected_focal, abs=1e-6)
    assert cross_entropy == pytest.approx(-math.log(p_true), abs=1e-6)
    assert focal < cross_entropy


def test_focal_alpha_per_class_and_float():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([0, 1])
    plain = FocalLoss(gamma=2.0)
    per_sample = [
        -((1 - p) ** 2) * math.log(p)
        for p in (math.exp(2) / (math.exp(2) + 1), math.exp(1) / (math.exp(1) + 1))
    ]
    assert plain(logits, targets).item() == pytest.approx(sum(per_sample) / 2, abs=1e-6)
    # Per-class alpha [0.25, 0.75] weighs each sample by the alpha of its class (no renormalising).
    weighted = FocalLoss(gamma=2.0, alpha=[0.25, 0.75])(logits, targets).item()
    assert weighted == pytest.approx((0.25 * per_sample[0] + 0.75 * per_sample[1]) / 2, abs=1e-6)
    # A float alpha is the same factor for every class.
    scaled = FocalLoss(gamma=2.0, alpha=0.5)(logits, targets).item()
    assert scaled == pytest.approx(0.5 * sum(per_sample) / 2, abs=1e-6)


def test_label_smoothing_hand_computed_two_classes():
    # Logits [1, 0], true class 0, smoothing 0.2 over 2 classes:
    # target distribution q = (1 - 0.2) * [1, 0] + 0.2 / 2 = [0.9, 0.1].
    # p = [e / (e + 1), 1 / (e + 1)] = [0.731059, 0.268941].
    # loss = -(0.9 * log 0.731059 + 0.1 * log 0.268941) = -(0.9 * -0.313262 + 0.1 * -1.313262)
    #      = 0.281936 + 0.131326 = 0.413262.
    logits = torch.tensor([[1.0, 0.0]])
    targets = torch.tensor([0])
    expected = 0.413262
    for name in ("ce", "focal"):
        loss = build_loss(name, 2, label_smoothing=0.2, focal_gamma=0.0)
        assert loss(logits, targets).item() == pytest.approx(expected, abs=1e-5), name


def test_class_weights_hand_computed():
    # Labels [0, 0, 0, 1] with 3 classes: counts [3, 1, 0].
    # power 1: raw weights [1/3, 1, 0] (class 2 has no samples -> 0).
    # Mean over samples of the raw weight: (3 * 1/3 + 1 * 1) / 4 = 0.5, so scale by 2 -> [2/3, 2, 0].
    weights = class_weights(np.array([0, 0, 0, 1]), n_classes=3)
    assert weights.dtype == torch.float32
    assert weights.tolist() == pytest.approx([2 / 3, 2.0, 0.0])
    # power 0.5: raw [3^-0.5, 1, 0] = [0.57735, 1, 0]; mean (3 * 0.57735 + 1) / 4 = 0.68301;
    # scaled: [0.57735 / 0.68301, 1 / 0.68301, 0] = [0.84530, 1.46410, 0].
    weights = class_weights(np.array([0, 0, 0, 1]), n_classes=3, power=0.5)
    assert weights.tolist() == pytest.approx([0.84530, 1.46410, 0.0], abs=1e-5)
    # power 0 gives plain ones for the classes present.
    assert class_weights(np.array([0, 0, 0, 1]), 3, power=0.0).tolist() == pytest.approx([1.0, 1.0, 0.0])


def test_class_weights_mean_over_samples_is_one():
    labels = np.random.default_rng(0).integers(0, 7, size=1000)
    weights = class_weights(labels, n_classes=7, power=0.7)
    assert weights[labels].mean().item() == pytest.approx(1.0, abs=1e-5)


def test_class_weights_rejects_out_of_range_labels():
    with pytest.raises(ValueError):
        class_weights(np.array([0, 3]), n_classes=3)


def test_weighted_cross_entropy_hand_computed():
    # Two examples, weights [2/3, 2] (from labels [0, 0, 0, 1]).
    # Example 1: logits [0, 0], class 0: -log 0.5 = 0.693147, weight 2/3.
    # Example 2: logits [0, log 3], class 1: p = 3/4, -log 0.75 = 0.287682, weight 2.
    # Weighted mean = (2/3 * 0.693147 + 2 * 0.287682) / (2/3 + 2) = (0.462098 + 0.575364) / 2.666667
    #               = 0.389048.
    weight = class_weights(np.array([0, 0, 0, 1]), n_classes=2)
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3)]])
    targets = torch.tensor([0, 1])
    for name in ("ce", "focal"):
        loss = build_loss(name, 2, focal_gamma=0.0, weight=weight)
        assert loss(logits, targets).item() == pytest.approx(0.389048, abs=1e-5), name


def test_f1_loss_perfect_wrong_and_gradient():
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    perfect = torch.nn.functional.one_hot(targets, 3).float() * 20
    wrong = torch.nn.functional.one_hot((targets + 1) % 3, 3).float() * 20
    loss = F1Loss()
    assert loss(perfect, targets).item() == pytest.approx(0.0, abs=1e-4)
    assert loss(wrong, targets).item() == pytest.approx(1.0, abs=1e-4)
    uncertain = torch.zeros(6, 3, requires_grad=True)
    value = loss(uncertain, targets)
    # Uniform probabilities: per class tp = 2/3, fp = 4/3, fn = 4/3 -> F1 = (4/3) / (4/3 + 8/3) = 1/3.
    assert value.item() == pytest.approx(2 / 3, abs=1e-5)
    value.backward()
    assert uncertain.grad is not None and uncertain.grad.abs().sum() > 0
    # Gradient descent must favour the true class.
    assert (uncertain.grad[torch.arange(6), targets] < 0).all()


def test_f1_loss_ignores_classes_absent_from_batch():
    targets = torch.tensor([0, 1])
    perfect = torch.nn.functional.one_hot(targets, 5).float() * 20
    assert F1Loss()(perfect, targets).item() == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_accepts_hard_and_soft_targets(name):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 4, generator=generator, requires_grad=True)
    hard = torch.randint(0, 4, (8,), generator=generator)
    # Mixup-style soft targets: a blend of two one-hot rows.
    one_hot = torch.nn.functional.one_hot
    soft = 0.7 * one_hot(hard, 4).float() + 0.3 * one_hot(hard.flip(0), 4).float()
    weight = torch.tensor([1.0, 2.0, 0.5, 1.0])
    loss = build_loss(name, 4, label_smoothing=0.1, weight=weight, ordinal_scale=2.0)
    for targets in (hard, soft):
        value = loss(logits, targets)
        assert value.ndim == 0 and torch.isfinite(value)
        value.backward()
    # Soft one-hot targets must give the same value as the equivalent integer targets.
    one_hot = torch.nn.functional.one_hot(hard, 4).float()
    unweighted = build_loss(name, 4, label_smoothing=0.1, ordinal_scale=2.0)
    assert unweighted(logits, one_hot).item() == pytest.approx(unweighted(logits, hard).item(), abs=1e-6)


def test_ce_plus_f1_is_the_sum():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 3, generator=generator)
    targets = torch.randint(0, 3, (8,), generator=generator)
    combined = build_loss("ce+f1", 3)(logits, targets).item()
    separate = nn.CrossEntropyLoss()(logits, targets).item() + F1Loss()(logits, targets).item()
    assert combined == pytest.approx(separate, abs=1e-6)


def test_unknown_loss_name_lists_the_choices():
    with pytest.raises(ValueError) as error:
        build_loss("hinge", 3)
    for name in LOSSES:
        assert name in str(error.value)


def test_ordinal_kernel_hand_computed():
    # scale ln 2: a class d steps away gets exp(-ln2 * d^2) = 2^-(d^2) before normalising: 1, 1/2, 1/16.
    # Row 0: [1, 1/2, 1/16] / (25/16) = [0.64, 0.32, 0.04]; row 1: [1/2, 1, 1/2] / 2 = [0.25, 0.5, 0.25].
    kernel = ordinal_kernel(3, math.log(2))
    assert kernel.tolist() == [pytest.approx(row, abs=1e-6) for row in
                               ([0.64, 0.32, 0.04], [0.25, 0.5, 0.25], [0.04, 0.32, 0.64])]
    assert torch.allclose(ordinal_kernel(4, 50.0), torch.eye(4))  # sharp: one-hot targets


def test_ordinal_loss_hand_computed_and_costs_less_for_a_neighbour():
    # 3 classes, scale ln 2, no smoothing, true class 0: target [0.64, 0.32, 0.04].
    # Logits [0, 0, 0]: p = 1/3 each, loss = -log(1/3) = 1.098612 whatever the target.
    # Logits [0, ln 2, 0]: p = [1/4, 1/2, 1/4];
    # loss = -(0.64 log 0.25 + 0.32 log 0.5 + 0.04 log 0.25) = 0.68 * 1.386294 + 0.32 * 0.693147 = 1.164488.
    loss = build_loss("ordinal", 3, ordinal_scale=math.log(2))
    assert loss(torch.zeros(1, 3), torch.tensor([0])).item() == pytest.approx(1.098612, abs=1e-5)
    assert loss(torch.tensor([[0.0, math.log(2), 0.0]]), torch.tensor([0])).item() == pytest.approx(1.164488, abs=1e-5)
    # Confident in the neighbour (class 1) costs less than confident in the far class (2); plain CE charges both alike.
    neighbour, far = torch.tensor([[0.0, 5.0, 0.0]]), torch.tensor([[0.0, 0.0, 5.0]])
    assert loss(neighbour, torch.tensor([0])) < loss(far, torch.tensor([0]))
    plain = build_loss("ce", 3)
    assert plain(neighbour, torch.tensor([0])).item() == pytest.approx(plain(far, torch.tensor([0])).item())
    with pytest.raises(ValueError, match="ordinal_scale"):
        build_loss("ordinal", 3)


def test_train_loss_ordinal_reaches_the_training_loss_with_its_scale(tmp_path):
    # The config's loss and scale reach what training minimises: the hand-computed case above, through make_loss.
    from conftest import make_config

    from pipeline.training.fold_setup import make_loss
    from pipeline.training.models import Heads

    cfg = make_config(tmp_path, "train.loss=ordinal", f"train.ordinal_scale={math.log(2)}", "train.label_smoothing=0")
    heads = Heads(["a", "b", "c"], [("target", ["a", "b", "c"])])
    compute_loss, _ = make_loss(cfg.train, heads, np.array([[0], [1], [2]]))
    value = compute_loss(torch.tensor([[0.0, math.log(2), 0.0]]), torch.tensor([[0]]))
    assert value.item() == pytest.approx(1.164488, abs=1e-5)
