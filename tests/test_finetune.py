"""Fine-tuning levers: layer-wise learning-rate decay and batch norm that keeps its pretrained statistics."""

from __future__ import annotations

import torch
from conftest import make_config
from torch.utils.data import DataLoader, TensorDataset

from pipeline.training import fold_setup
from pipeline.training.loop import StepState, train_one_epoch
from pipeline.training.models import Heads, create_model

HEADS = Heads(["a", "b"], [("target", ["a", "b"])])


def lcnet():
    torch.manual_seed(0)
    return create_model("lcnet_050", HEADS, 1, [0.5], [0.5])


def test_layer_decay_scales_each_layer_below_the_classifier(tmp_path):
    """timm numbers lcnet_050's layers stem 0 ... classifier L; with decay d and backbone_lr_mult m a layer k below
    the classifier learns at lr * d**k * m, the classifier at lr."""
    cfg = make_config(tmp_path, "train.lr=0.1", "train.layer_decay=0.5", "train.backbone_lr_mult=0.5")
    model = lcnet()
    optimizer = fold_setup.make_optimizer(cfg.train, model)
    scale_of = {id(p): group["lr_scale"] for group in optimizer.param_groups for p in group["params"]}
    assert len(scale_of) == len(list(model.parameters()))
    classifier = model.backbone.get_classifier()
    assert scale_of[id(classifier.weight)] == 1.0
    stem = scale_of[id(model.backbone.conv_stem.weight)]
    layers = len({group["lr_scale"] for group in optimizer.param_groups})
    assert stem == 0.5 ** (layers - 1) * 0.5
    # and the lr each group starts at follows its scale
    assert all(abs(group["lr"] - 0.1 * group["lr_scale"]) < 1e-12 for group in optimizer.param_groups)


def one_epoch(frozen_norm: bool):
    model = lcnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (16, 1, 32, 32), dtype=torch.uint8)
    loader = DataLoader(TensorDataset(images, torch.randint(0, 2, (16, 1))), batch_size=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_one_epoch(model, loader, optimizer, lambda logits, y: torch.nn.functional.cross_entropy(logits, y[:, 0]),
                    torch.device("cpu"), state=StepState(), frozen_norm=frozen_norm)
    after = model.state_dict()
    changed = lambda suffix: any(not torch.equal(before[k], after[k]) for k in before if k.endswith(suffix))  # noqa
    return changed("running_mean"), changed("running_var"), changed("classifier.weight"), changed("bn1.bias")


def test_frozen_norm_keeps_the_running_statistics_and_trains_the_rest():
    assert one_epoch(frozen_norm=False)[:3] == (True, True, True)
    mean_moved, var_moved, classifier_trained, norm_shift_trained = one_epoch(frozen_norm=True)
    assert (mean_moved, var_moved) == (False, False)
    assert classifier_trained and norm_shift_trained
