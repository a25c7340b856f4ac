"""The training keys by their behaviour: warm-up per update (fractions too), freezing, the backbone's learning
rate, early stopping, EMA and mixup."""

import numpy as np
import pytest
import torch
from conftest import make_config

from pipeline import folds, prepare
from pipeline.config import load_config
from pipeline.training import fold_setup, kfold
from pipeline.training.models import Heads, classifier_parameters, create_model

HEADS = Heads(["a", "b", "c"], [("target", ["a", "b", "c"])])


def learning_rates(overrides, steps_per_epoch=4, epochs=3, updates=4):
    cfg = load_config(None, ["train.lr=0.01", *overrides])
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.01)
    scheduler, _ = fold_setup.make_scheduler(cfg.train, optimizer, steps_per_epoch, epochs)
    rates = [optimizer.param_groups[0]["lr"]]
    for update in range(1, updates):
        scheduler.step_update(update)
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


@pytest.mark.parametrize(("warmup", "expected"), [
    # From warmup_lr = lr / 100 up to lr in warmup_epochs x 4 updates, linearly, then the cosine from lr.
    (0.5, [1e-4, 1e-4 + 0.5 * (0.01 - 1e-4), 0.01]),
    (1.0, [1e-4, 1e-4 + 0.25 * (0.01 - 1e-4), 1e-4 + 0.5 * (0.01 - 1e-4), 1e-4 + 0.75 * (0.01 - 1e-4), 0.01]),
    (0.0, [0.01]),
])
def test_warmup_rates_per_update_by_hand(warmup, expected):
    rates = learning_rates([f"train.warmup_epochs={warmup}"], updates=len(expected))
    np.testing.assert_allclose(rates, expected, rtol=1e-9)


def test_backbone_lr_mult_sets_the_backbone_group_only():
    cfg = load_config(None, ["train.lr=0.01", "train.backbone_lr_mult=0.1"])
    model = create_model("lcnet_050", HEADS, 1, [0.5], [0.25])
    optimizer = fold_setup.make_optimizer(cfg.train, model)
    head = {id(p) for p in classifier_parameters(model)}
    body_group, head_group = optimizer.param_groups
    assert body_group["lr"] == pytest.approx(0.001) and head_group["lr"] == pytest.approx(0.01)
    assert {id(p) for p in head_group["params"]} == head and not head & {id(p) for p in body_group["params"]}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    work = tmp_path_factory.mktemp("keys") / "work"
    cfg = make_config(work, "backbones=[lcnet_050]")
    prepare.main(cfg)
    folds.main(cfg)
    return work


def trained(prepared, tmp_path, *overrides, on_epoch=None):
    cfg = make_config(prepared, "backbones=[lcnet_050]", *overrides)
    data = kfold.load_training_data(cfg)
    result = kfold.train_fold(cfg, "lcnet_050", data, 0, tmp_path / "fold0", on_epoch=on_epoch)
    return cfg, data, result, torch.load(tmp_path / "fold0" / "last.pt", weights_only=False)


@pytest.mark.slow
def test_a_frozen_epoch_trains_the_classifier_only(prepared, tmp_path):
    cfg, data, _, last = trained(prepared, tmp_path, "train.freeze_epochs=1", "train.epochs=1")
    kfold.seed_everything(cfg.train.seed)  # the seed train_fold built fold 0's model with
    initial = create_model("lcnet_050", data.heads, 1, data.mean, data.std).state_dict()
    model = create_model("lcnet_050", data.heads, 1, data.mean, data.std)
    head = {name for name, p in model.named_parameters() if id(p) in {id(q) for q in classifier_parameters(model)}}
    for name, _ in model.named_parameters():
        moved = not torch.equal(last["model"][name], initial[name])
        assert moved == (name in head), name


@pytest.mark.slow
def test_patience_stops_at_the_epoch_it_names(prepared, tmp_path, monkeypatch):
    scores = iter([0.5, 0.4, 0.45, 0.9, 0.9])  # best at epoch 1, then two epochs without a gain
    real = kfold.metrics.score
    monkeypatch.setattr(kfold.metrics, "score", lambda metric, y, p: next(scores) if metric == "macro_f1"
                        else real(metric, y, p))
    _, _, result, _ = trained(prepared, tmp_path, "train.patience=2", "train.keep_epoch=best", "train.epochs=5",
                              "train.warmup_epochs=0")
    assert [h["epoch"] for h in result.history] == [1, 2, 3] and result.best_epoch == 0


@pytest.mark.slow
@pytest.mark.parametrize(("keep", "epoch", "score"), [("best", 1, 0.9), ("last", 2, 0.4)])
def test_keep_epoch_names_the_epoch_a_fold_keeps_and_scores(prepared, tmp_path, monkeypatch, keep, epoch, score):
    scores = iter([0.5, 0.9, 0.4])  # the best at epoch 2 of 3 (index 1), the last lower
    real = kfold.metrics.score
    monkeypatch.setattr(kfold.metrics, "score", lambda metric, y, p: next(scores) if metric == "macro_f1"
                        else real(metric, y, p))
    _, _, result, last = trained(prepared, tmp_path, f"train.keep_epoch={keep}", "train.epochs=3")
    kept = torch.load(tmp_path / "fold0" / "best.pt", weights_only=False)
    assert (result.best_epoch, result.best_score, kept["epoch"]) == (epoch, score, epoch)
    # what the fold scores as its OOF is what it keeps for infer: the last epoch's weights when keep_epoch is last
    assert torch.equal(kept["model"]["backbone.conv_stem.weight"], last["model"]["backbone.conv_stem.weight"]) == (
        keep == "last")


@pytest.mark.slow
def test_ema_weights_are_saved_as_best_and_trail_the_live_ones(prepared, tmp_path):
    _, _, _, last = trained(prepared, tmp_path, "train.ema=true", "train.ema_decay=0.9", "train.epochs=1")
    best = torch.load(tmp_path / "fold0" / "best.pt", weights_only=False)["model"]
    ema = {name.removeprefix("module."): tensor for name, tensor in last["ema"].items()}
    weight = "backbone.conv_stem.weight"
    torch.testing.assert_close(best[weight], ema[weight])  # what is validated and kept is the average
    assert not torch.equal(ema[weight], last["model"][weight])  # which lags the live weights


def test_mixup_targets_are_distributions_that_mix_two_images():
    cfg = load_config(None, ["train.mixup=0.4", "train.cutmix=0", "train.label_smoothing=0"])
    mixup = fold_setup.make_mixup(cfg.train, HEADS)
    torch.manual_seed(0)
    images = torch.rand(8, 1, 8, 8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    mixed, targets = mixup(images.clone(), labels)
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    # One weight per batch: each image is lam x itself + (1 - lam) x its mirror in the batch, and so is its target.
    lam = targets[0, 0].item()
    assert 0 < lam < 1
    one_hot = torch.nn.functional.one_hot(labels, 3).float()
    torch.testing.assert_close(targets, lam * one_hot + (1 - lam) * one_hot.flip(0))
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.flip(0))
