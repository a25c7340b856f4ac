"""Training: OOF contract, resume after a kill, accumulation, reproducibility, model errors."""

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_config

from pipeline import ensemble, folds, infer, metrics, prepare, train
from pipeline.data.images import Cache
from pipeline.errors import ConfigError
from pipeline.training import fold_setup, kfold
from pipeline.training.loop import StepState, train_one_epoch
from pipeline.training.models import Heads, check_backbone, create_model


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The smoke competition, prepared and folded once for the module."""
    work = tmp_path_factory.mktemp("train") / "work"
    cfg = make_config(work, "backbones=[lcnet_050]")
    prepare.main(cfg)
    folds.main(cfg)
    return work


def config(prepared, *overrides):
    return make_config(prepared, "backbones=[lcnet_050]", *overrides)


@pytest.mark.slow
def test_smoke_training_writes_oof_covering_every_id_once(prepared):
    cfg = config(prepared)
    report = train.main(cfg)["lcnet_050"]
    oof = pd.read_parquet(cfg.path("oof") / "lcnet_050.parquet")
    fold_table = pd.read_csv(cfg.path("folds"))
    assert sorted(oof["id"]) == sorted(fold_table["id"]) and oof["id"].is_unique
    classes = ["p000", "p033", "p067", "p100"]
    assert list(oof.columns) == ["id", "fold", *classes]
    np.testing.assert_allclose(oof[classes].sum(axis=1), 1.0, atol=1e-6)
    assert dict(zip(oof["id"], oof["fold"])) == dict(zip(fold_table["id"], fold_table["fold"]))
    assert len(report["folds"]) == 2 and 0 <= report["cv"] <= 1
    for fold in (0, 1):
        checkpoint = torch.load(cfg.path("models") / "lcnet_050" / f"fold{fold}" / "best.pt", weights_only=False)
        assert checkpoint["heads"]["class_names"] == classes and checkpoint["config"]["train"]["epochs"] == 1
    assert (cfg.path("plots") / "confusion_lcnet_050.png").stat().st_size > 0
    assert (cfg.path("logs") / "dvclive" / "lcnet_050" / "fold0" / "plots" / "metrics").is_dir()  # train.loggers
    assert sorted(p.name for p in (cfg.path("plots") / "curves" / "lcnet_050").iterdir()) == [
        "lr.tsv", "macro_f1.tsv", "train_loss.tsv", "val_loss.tsv"]  # both folds in each, for dvc plots show

    # infer on the same checkpoints: its plain view is train's OOF, its merged view is what it writes (that each
    # view is the transformed image's prediction is tests/test_infer.py's, with a model that is not invariant).
    infer.main(make_config(prepared, "backbones=[lcnet_050]", "infer.tta=[hflip,vflip]"))
    views = pd.read_csv(cfg.path("preds") / "lcnet_050_tta.csv")
    assert views["view"].tolist() == ["plain", "vflip", "hflip", "hflip+vflip", "merged (mean)"]
    labels = fold_table.set_index("id").loc[oof["id"], "label"].map(classes.index).to_numpy()
    plain = metrics.score("macro_f1", labels, oof[classes].to_numpy())
    assert views.loc[0, "macro_f1"] == pytest.approx(plain, abs=1e-9)
    tta_oof = pd.read_parquet(cfg.path("preds") / "lcnet_050_oof.parquet").set_index("id").loc[oof["id"]]
    merged = metrics.score("macro_f1", labels, tta_oof[classes].to_numpy())
    assert views.loc[4, "macro_f1"] == pytest.approx(merged, abs=1e-9)


@pytest.mark.parametrize(("overrides", "power"), [(["train.oversample=true", "train.balance_power=1"], 1.0),
                                                  (["train.oversample=true", "train.balance_power=0.5"], 0.5),
                                                  (["train.oversample=false"], 0.0)])
def test_sampler_draws_classes_in_proportion_to_count_to_the_one_minus_power(prepared, overrides, power):
    cfg = config(prepared, "train.batch_size=8", *overrides)
    data = kfold.load_training_data(cfg)
    indices = np.arange(len(data.ids))
    counts = np.bincount(data.labels, minlength=4).astype(float)
    expected = counts ** (1 - power) / (counts ** (1 - power)).sum()  # class c drawn ~ n_c * n_c^-power
    drawn = np.zeros(4)
    for epoch_seed in range(200):
        loader = fold_setup.make_train_loader(cfg, data, indices, torch.device("cpu"), seed=epoch_seed)
        labels = data.labels[np.asarray(list(iter(loader.sampler)) if loader.sampler is not None else indices)]
        drawn += np.bincount(labels, minlength=4)
    assert counts.max() > 2 * counts.min()  # imbalanced enough for the three powers to differ
    np.testing.assert_allclose(drawn / drawn.sum(), expected, atol=0.02)


class Interrupted(Exception):
    pass


def kill_after_first_epoch(epoch, score):
    if epoch == 0:
        raise Interrupted  # after last.pt of epoch 1 is on disk, as a SIGKILL between epochs would leave it


@pytest.mark.slow
def test_resume_after_a_kill_reaches_the_same_weights(prepared, tmp_path):
    cfg = config(prepared, "train.epochs=3", "train.ema=true")
    data = kfold.load_training_data(cfg)
    whole = kfold.train_fold(cfg, "lcnet_050", data, 0, tmp_path / "whole")
    with pytest.raises(Interrupted):
        kfold.train_fold(cfg, "lcnet_050", data, 0, tmp_path / "killed", on_epoch=kill_after_first_epoch)
    assert torch.load(tmp_path / "killed" / "last.pt", weights_only=False)["epoch"] == 0
    resumed = kfold.train_fold(cfg, "lcnet_050", data, 0, tmp_path / "killed")
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    first = torch.load(tmp_path / "whole" / "last.pt", weights_only=False)
    second = torch.load(tmp_path / "killed" / "last.pt", weights_only=False)
    for name, tensor in first["model"].items():
        torch.testing.assert_close(second["model"][name], tensor, msg=name)
    np.testing.assert_allclose(resumed.validation_proba, whole.validation_proba)
    # A finished fold is not trained again; a changed setting starts afresh.
    again = kfold.train_fold(cfg, "lcnet_050", data, 0, tmp_path / "killed",
                             on_epoch=lambda *_: pytest.fail("a finished fold was trained again"))
    assert again.best_score == resumed.best_score
    changed = config(prepared, "train.epochs=1")
    assert len(kfold.train_fold(changed, "lcnet_050", data, 0, tmp_path / "killed").history) == 1


def test_accumulating_two_batches_of_8_equals_one_of_16():
    torch.manual_seed(0)
    images = torch.randint(0, 255, (16, 1, 4, 4), dtype=torch.uint8)
    targets = torch.randint(0, 3, (16, 1))

    def run(batch_size, accumulate):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))  # no batch norm
        wrapped = torch.nn.Sequential()
        wrapped.forward = lambda x: model(x.float() / 255)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, targets), batch_size=batch_size)
        loss = torch.nn.CrossEntropyLoss()
        train_one_epoch(wrapped, loader, optimizer, lambda logits, y: loss(logits, y[:, 0]), torch.device("cpu"),
                        state=StepState(), accumulate=accumulate)
        return [p.detach().clone() for p in model.parameters()]

    for whole, accumulated in zip(run(16, 1), run(8, 2)):
        torch.testing.assert_close(whole, accumulated)


def test_unknown_backbone_lists_close_names():
    with pytest.raises(ConfigError, match="resnet18"):
        check_backbone("resnet_18")


def test_pretrained_weights_that_cannot_be_had_say_how_to_give_a_file(tmp_path):
    heads = Heads(["a", "b"], [("target", ["a", "b"])])
    with pytest.raises(ConfigError, match="pretrained_file"):
        create_model("lcnet_050", heads, 1, [0.5], [0.2], pretrained_file=str(tmp_path / "missing.pth"))


def test_local_pretrained_file_is_loaded(tmp_path):
    import timm

    source = timm.create_model("lcnet_050", num_classes=10)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    heads = Heads(["a", "b", "c"], [("target", ["a", "b", "c"])])
    model = create_model("lcnet_050", heads, 3, [0.5] * 3, [0.2] * 3, pretrained_file=str(tmp_path / "weights.pth"))
    torch.testing.assert_close(model.backbone.conv_stem.weight, source.conv_stem.weight)
    assert model.backbone.get_classifier().out_features == 3  # the old classifier is dropped


def test_composed_heads_give_a_distribution_over_the_submitted_classes():
    heads = Heads.from_meta({"class_names": [str(i) for i in range(18)], "compose": "mask*6 + gender*3 + age",
                             "heads": {"mask": ["0", "1", "2"], "gender": ["0", "1"], "age": ["0", "1", "2"]},
                             "aux": {}}, [])
    logits = torch.randn(5, 8)
    proba = heads.probabilities(logits)
    assert proba.shape == (5, 18)
    torch.testing.assert_close(proba.sum(1), torch.ones(5))
    mask, gender, age = (part.softmax(1) for part in heads.split(logits))
    torch.testing.assert_close(proba[:, 17], mask[:, 2] * gender[:, 1] * age[:, 2])


@pytest.mark.slow
def test_one_model_under_two_seeds_is_two_members_with_their_own_weights(tmp_path):
    # A seed ensemble is configured, not built: two backbones entries naming one timm model, each its own train.seed.
    two_seeds = "backbones={lcnet_050_s0: {model: lcnet_050, seed: 0}, lcnet_050_s1: {model: lcnet_050, seed: 1}}"
    cfg = make_config(tmp_path / "work", "features.enabled=false", "embed.enabled=false", "infer.tta=[]", two_seeds)
    prepare.main(cfg)
    folds.main(cfg)
    train.main(cfg)
    infer.main(cfg)
    first, second = (torch.load(cfg.path("models") / name / "fold0" / "best.pt", weights_only=False)
                     for name in ("lcnet_050_s0", "lcnet_050_s1"))
    assert (first["config"]["train"]["seed"], second["config"]["train"]["seed"]) == (0, 1)
    assert {k: v.shape for k, v in first["model"].items()} == {k: v.shape for k, v in second["model"].items()}
    assert any(not torch.equal(first["model"][k], second["model"][k]) for k in first["model"])
    members = ensemble.load_members(cfg, Cache.open(cfg))
    assert members.names == ["lcnet_050_s0", "lcnet_050_s1"]
    assert not np.allclose(members.oof[0], members.oof[1])
