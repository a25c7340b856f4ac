"""The pieces of the members that train no network which need only torch, timm and numpy: the embed member's frozen
backbone and its pooled features of an image's views, the features member's encoding of images with its
k-means filters, and the saved per-fold logistic regressions that read either.

The embed and features stages fit the regressions (scikit-learn, through ``linear``) and save what predicting needs
with :func:`save_regressions`; the code-competition kernel, which has no scikit-learn and no config, loads them with
:func:`load_regressions` and predicts as the stages predicted their test images: each fold's regression on
standardised features (:func:`regression_proba`), the folds' probabilities averaged.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.artifacts import atomic_path
from pipeline.errors import ConfigError, DataError
from pipeline.training import weights

KEY, STAGES_KEY, TTA_KEY = "embed.backbones", "embed.stages", "embed.tta"
FOLD_ARRAYS = ("mean", "scale", "coef", "intercept", "classes")  # one fold's regression, as saved
CONTRAST_EPS = 0.1  # the features member: added to a patch's standard deviation (pixels in [0, 1]): flat patches stay
POOL_MEAN_GRID, POOL_MAX_GRID = 3, 2  # near zero; its responses' means over a 3 x 3 grid, maxima over 2 x 2
ENCODE_BATCH = 64  # images encoded at a time


def backbone_source(name: str):
    """(timm model name, weights file or None for the hub) of an entry of ``embed.backbones``: a packaged weight,
    ``timm_model=path``, or a timm name; an entry that names neither is a ConfigError."""
    import timm

    try:
        if weights.packaged_key(name):
            model_name, path = weights.PACKAGED[weights.packaged_key(name)].timm_model, weights.resolve_weights(name)
        elif "=" in name:
            model_name, file = name.split("=", 1)
            path = weights.resolve_weights(file)
        else:
            model_name, path = name, None
    except ConfigError as error:  # resolve_weights names train.pretrained_file: the entry is embed.backbones's
        raise ConfigError(str(error).replace(weights.KEY, KEY, 1)) from None
    if not timm.is_model(model_name):
        raise ConfigError(f"{KEY}: {model_name!r} is not a timm model nor a packaged weight "
                          f"({', '.join(weights.PACKAGED)})")
    return model_name, path


def backbone_model(model_name: str, path: Path | None, in_chans: int) -> tuple[nn.Module, list[float], list[float]]:
    """(the timm model without its classifier, in eval mode, the mean and std its weights expect): the weights read
    from ``path``, or from the hub when ``path`` is None."""
    import timm

    if path is None:
        with weights.hub_weights(model_name):
            model = timm.create_model(model_name, pretrained=True, num_classes=0, in_chans=in_chans)
    else:
        model = timm.create_model(model_name, pretrained=False, num_classes=0, in_chans=in_chans)
        weights.load_weights(model, Path(path))
    mean, std = weights.input_normalisation(timm.data.resolve_data_config({}, model=model), in_chans)
    return model.eval(), mean, std


def frozen_backbone(name: str, in_chans: int) -> tuple[nn.Module, list[float], list[float]]:
    """:func:`backbone_model` for an entry of ``embed.backbones``: a packaged weight, ``timm_model=path``, or a timm
    name (pretrained from the hub)."""
    return backbone_model(*backbone_source(name), in_chans)


def pooled(feature_map: torch.Tensor) -> torch.Tensor:
    """N x C x H x W -> N x 2C: each channel's mean, then each channel's maximum."""
    return torch.cat([feature_map.mean((2, 3)), feature_map.amax((2, 3))], 1)


def check_stages(model: nn.Module, model_name: str, stages: int) -> None:
    """A ConfigError when ``embed.stages`` asks for intermediate feature maps that the timm model cannot give."""
    available = len(getattr(model, "feature_info", []) or [])
    if stages and (not hasattr(model, "forward_intermediates") or stages > available):
        raise ConfigError(f"{STAGES_KEY}: {stages} intermediate stages asked of {model_name!r}, which gives "
                          f"{available if hasattr(model, 'forward_intermediates') else 'none'} through timm's "
                          f"forward_intermediates; set {STAGES_KEY}=0 for its final features only")


def pooled_maps(model: nn.Module, batch: torch.Tensor, stages: int) -> torch.Tensor:
    """The pooled final feature map (:func:`pooled`) and, with ``stages``, the pooled outputs of the model's last
    ``stages`` feature stages (timm's ``forward_intermediates``, one forward pass), side by side."""
    if not stages:
        return pooled(model.forward_features(batch))
    final, intermediates = model.forward_intermediates(batch, indices=stages)
    return torch.cat([pooled(final), *(pooled(feature_map) for feature_map in intermediates)], 1)


def embed_images(model: nn.Module, images: np.ndarray, mean, std, tta: list[str], batch_size: int, desc: str,
                 device: torch.device | None = None, stages: int = 0) -> np.ndarray:
    """N x H x W x C uint8 images -> N x D float32 pooled features (:func:`pooled_maps`), the mean over the ttach
    views that ``tta`` names (``["hflip"]``: the image and its mirror image), computed on ``device`` (the CPU by
    default)."""
    from tqdm import tqdm

    from pipeline.training.views import tta_transforms

    views = tta_transforms(tta, images.shape[1:3], TTA_KEY) or [None]
    device = device or torch.device("cpu")
    model = model.to(device)
    mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
    std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0
    out = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", file=sys.stderr,
                          mininterval=5.0, disable=None):
            batch = torch.from_numpy(np.array(images[start:start + batch_size])).to(device).permute(0, 3, 1, 2)
            batch = (batch.float() - mean) / std
            features = sum(pooled_maps(model, view.augment_image(batch) if view else batch, stages) for view in views)
            out.append((features / len(views)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


# ---------------------------------------------------------------- the features member's encoding

def encode(images: np.ndarray, filters: torch.Tensor, stride: int, threshold: float) -> np.ndarray:
    """N x H x W x C uint8 images -> N x (K * (3*3 + 2*2)) features: each filter's response to every contrast-
    normalised patch, ``max(0, response - threshold)``, then means over a 3 x 3 grid and maxima over 2 x 2."""
    clusters, channels, patch, _ = filters.shape
    box = torch.ones(1, channels, patch, patch) / (channels * patch * patch)
    centred = filters - filters.mean((1, 2, 3), keepdim=True)
    out = []
    with torch.no_grad():
        for start in range(0, len(images), ENCODE_BATCH):
            batch = torch.from_numpy(np.array(images[start:start + ENCODE_BATCH])).permute(0, 3, 1, 2).float()
            batch /= 255.0
            mean = F.conv2d(batch, box, stride=stride)
            std = (F.conv2d(batch ** 2, box, stride=stride) - mean ** 2).clamp_min(0).sqrt()
            # (patch - its mean) . filter = patch . (filter - its mean): one convolution with zero-mean filters. In
            # place: the responses are the largest tensor here, and memory, not arithmetic, sets the pace.
            active = F.conv2d(batch, centred, stride=stride).div_(std + CONTRAST_EPS)
            active.sub_(threshold).relu_()
            out.append(torch.cat([F.adaptive_avg_pool2d(active, POOL_MEAN_GRID).flatten(1),
                                  F.adaptive_max_pool2d(active, POOL_MAX_GRID).flatten(1)], 1).numpy())
    return np.concatenate(out) if out else np.zeros((0, clusters * (POOL_MEAN_GRID ** 2 + POOL_MAX_GRID ** 2)))


# ---------------------------------------------------------------- the saved regressions

def save_regressions(path: Path, fold_models: list[dict], meta: dict) -> None:
    """One .npz (written atomically): ``meta`` as JSON (backbones, image size, normalisation, class names...) and
    each fold's standardisation (mean, scale) and regression (coef, intercept, the class index of each row), with any
    other arrays of the fold (the features member's filters)."""
    arrays = {"meta": np.array(json.dumps({**meta, "folds": len(fold_models)}))}
    for index, model in enumerate(fold_models):
        arrays |= {f"fold{index}_{name}": np.asarray(value) for name, value in model.items()}
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            np.savez(handle, **arrays)


def load_regressions(path: Path) -> tuple[dict, list[dict]]:
    """(meta, each fold's arrays) of a file :func:`save_regressions` wrote; a missing or damaged one is a DataError."""
    try:
        with np.load(path, allow_pickle=False) as content:
            meta = json.loads(str(content["meta"]))
            folds = [{key.split("_", 1)[1]: content[key] for key in content.files if key.startswith(f"fold{index}_")}
                     for index in range(meta["folds"])]
            missing = [f"fold{index}_{name}" for index, fold in enumerate(folds) for name in FOLD_ARRAYS
                       if name not in fold]
            if missing:
                raise KeyError(f"no {missing[0]}")
    except (OSError, KeyError, ValueError) as error:
        raise DataError(f"the member's regressions {path} are missing or damaged ({error}): re-run its stage "
                        f"(dvc repro)") from None
    return meta, folds


def regression_proba(model: dict, x: np.ndarray, n_classes: int) -> np.ndarray:
    """One fold's probabilities, as scikit-learn's ``predict_proba`` gives them after its StandardScaler: a sigmoid
    for two classes, a softmax for more; a class the fold did not train on keeps probability 0."""
    decision = ((np.asarray(x, dtype=np.float64) - model["mean"]) / model["scale"]) @ model["coef"].T
    decision = decision + model["intercept"]
    if decision.shape[1] == 1:
        positive = 1.0 / (1.0 + np.exp(-decision[:, 0]))
        fold = np.stack([1 - positive, positive], axis=1)
    else:
        fold = np.exp(decision - decision.max(axis=1, keepdims=True))
        fold /= fold.sum(axis=1, keepdims=True)
    proba = np.zeros((len(x), n_classes))
    proba[:, model["classes"]] = fold
    return proba / proba.sum(axis=1, keepdims=True)


def folds_proba(fold_models: list[dict], x: np.ndarray, n_classes: int) -> np.ndarray:
    """The folds' regressions on the same features averaged, as the embed stage averages them for its test
    probabilities."""
    return sum(regression_proba(model, x, n_classes) for model in fold_models) / len(fold_models)


def features_member_proba(fold_models: list[dict], settings: dict, images: np.ndarray, n_classes: int) -> np.ndarray:
    """The features member's probabilities: each fold's own filters (one dictionary per ``features.patch``) encode
    the images, its regression reads them, and the folds are averaged, as the features stage predicted its test
    images (``settings``: the saved ``features.*``)."""
    total = 0.0
    for model in fold_models:
        x = np.concatenate([encode(images, torch.from_numpy(model[f"filters{index}"]), stride, settings["threshold"])
                            for index, stride in enumerate(settings["stride"])], 1)
        total = total + regression_proba(model, x, n_classes)
    return total / len(fold_models)
