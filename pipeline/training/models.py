"""A timm backbone with one classifier output per head, and the class probabilities it implies.

``timm.create_model`` is the single way in: timm is the registry of backbones. The
classifier has one block of logits per head (the target, or the heads the target is
composed from, then any auxiliary heads); ``Heads`` turns those logits into probabilities
over the submitted classes. The model takes uint8 images and normalises them itself, so
the data loader moves bytes, not floats, and a checkpoint carries its own normalisation.
"""

from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.errors import ConfigError, PipelineError
from pipeline.formula import eval_formula
from pipeline.training import weights


@dataclass
class Heads:
    """What the classifier's logits mean.

    ``heads`` are (column, class names) whose probabilities compose the submitted classes;
    with a single head it is the target itself. ``aux`` heads are trained but not
    submitted. ``compose_index[c]`` gives each head's class index for submitted class c.
    """

    class_names: list[str]
    heads: list[tuple[str, list[str]]]
    aux: list[tuple[str, list[str]]] = field(default_factory=list)
    compose_index: list[list[int]] | None = None

    @classmethod
    def from_meta(cls, meta: dict, aux_cols: list[str]) -> Heads:
        """Build from the image cache's meta.json (classes, heads, compose formula)."""
        class_names = meta["class_names"]
        aux = [(col, meta["aux"][col]) for col in aux_cols if col in meta.get("aux", {})]
        if not meta.get("heads") or not meta.get("compose"):
            return cls(class_names, [("target", class_names)], aux)
        heads = list(meta["heads"].items())
        lookup = {name: index for index, name in enumerate(class_names)}
        compose_index: list[list[int] | None] = [None] * len(class_names)
        for combo in itertools.product(*[range(len(names)) for _, names in heads]):
            values = {col: int(float(names[i])) for (col, names), i in zip(heads, combo)}
            target = str(eval_formula(meta["compose"], values))
            if target in lookup and compose_index[lookup[target]] is None:
                compose_index[lookup[target]] = list(combo)
        if any(index is None for index in compose_index):
            missing = [class_names[i] for i, index in enumerate(compose_index) if index is None]
            raise PipelineError(f"data.compose cannot produce class(es) {missing} from the heads")
        return cls(class_names, heads, aux, compose_index)

    @property
    def sizes(self) -> list[int]:
        return [len(names) for _, names in self.heads + self.aux]

    def split(self, logits: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(logits, self.sizes, dim=1))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Submitted-class probabilities: softmax per head, composed as a product of head probabilities."""
        parts = self.split(logits)[: len(self.heads)]
        if self.compose_index is None:
            return parts[0].float().softmax(dim=1)
        index = torch.as_tensor(self.compose_index, device=logits.device)
        proba = torch.ones(logits.shape[0], len(self.class_names), device=logits.device)
        for head, part in enumerate(parts):
            proba = proba * part.float().softmax(dim=1)[:, index[:, head]]
        # The product over heads is a distribution over all combinations; renormalise in
        # case the formula maps several combinations to one class or leaves some out.
        return proba / proba.sum(dim=1, keepdim=True).clamp_min(1e-12)

    def to_dict(self) -> dict:
        return {"class_names": self.class_names, "heads": self.heads, "aux": self.aux,
                "compose_index": self.compose_index}

    @classmethod
    def from_dict(cls, data: dict) -> Heads:
        return cls(data["class_names"], [tuple(h) for h in data["heads"]], [tuple(a) for a in data["aux"]],
                   data["compose_index"])


class Classifier(nn.Module):
    """uint8 N x C x H x W in, concatenated head logits out."""

    def __init__(self, backbone: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        return self.backbone(x)

    def normalisation(self) -> tuple[list[float], list[float]]:
        """The (mean, std) per channel, 0-1 scale, this model normalises with: what its checkpoint records."""
        return (self.mean / 255.0).flatten().tolist(), (self.std / 255.0).flatten().tolist()


class ProbabilityModel(nn.Module):
    """Images -> submitted-class probabilities; what TTA wraps, so views merge as probabilities."""

    def __init__(self, model: nn.Module, heads: Heads):
        super().__init__()
        self.model = model
        self.heads = heads

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.heads.probabilities(self.model(images))


def check_backbone(name: str) -> None:
    """Fail with close timm names when ``name`` is not a timm model."""
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=6, cutoff=0.6)
        hint = f"; close names: {', '.join(close)}" if close else "; see timm.list_models('*pattern*')"
        raise ConfigError(f"backbone {name!r} is not a timm model{hint}")


def create_model(name: str, heads: Heads, in_chans: int, mean: list[float], std: list[float],
                 pretrained: bool = False, pretrained_file: str | None = None, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> Classifier:
    """A timm backbone with ``sum(heads.sizes)`` outputs, wrapped to take uint8 images.

    ``pretrained`` loads timm's weights for ``name`` from the Hugging Face hub (or its local cache; without the
    network it fails at once, ``weights.hub_weights``); ``pretrained_file`` (a path or a packaged name,
    ``weights.PACKAGED``) loads a local file instead, strictly (``weights.load_weights``). Either way the first
    convolution is adapted to ``in_chans``, the old classifier is dropped, and the images are normalised as the
    weights expect (their timm pretrained config); ``mean``/``std`` (0-1 scale, per channel) normalise a model
    that starts from scratch, or one rebuilt from a checkpoint (whose state_dict brings its own).
    """
    import timm

    check_backbone(name)
    kwargs = {"num_classes": sum(heads.sizes), "in_chans": in_chans, "drop_rate": drop_rate}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    path = weights.resolve_weights(pretrained_file) if pretrained_file else None
    if pretrained and path is None:
        with weights.hub_weights(name):
            backbone = timm_backbone(name, True, kwargs)
    else:
        backbone = timm_backbone(name, False, kwargs)
    if path is not None:
        weights.load_weights(backbone, path)
    if pretrained or path is not None:
        mean, std = weights.input_normalisation(timm.data.resolve_data_config({}, model=backbone), in_chans)
    return Classifier(backbone, mean, std)


def timm_backbone(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    """``timm.create_model``, without ``drop_path_rate`` for the backbones that take none."""
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as error:
        if "drop_path_rate" not in str(error):
            raise
        return timm.create_model(name, pretrained=pretrained, **{k: v for k, v in kwargs.items()
                                                                  if k != "drop_path_rate"})


def classifier_parameters(model: Classifier) -> list[nn.Parameter]:
    """The parameters of timm's classifier layer (the part trained while the backbone is frozen)."""
    classifier = model.backbone.get_classifier()
    return list(classifier.parameters()) if isinstance(classifier, nn.Module) else []


def set_backbone_frozen(model: Classifier, frozen: bool) -> None:
    """Freeze everything but the classifier (feature extraction), or unfreeze all (fine-tuning)."""
    head = {id(p) for p in classifier_parameters(model)}
    for parameter in model.parameters():
        parameter.requires_grad = (id(parameter) in head) or not frozen
