"""The typed configuration every stage reads.

One YAML file drives the pipeline. Every key has a default here (the embedded ELPV
competition on a CPU), so a preset in ``configs/`` lists only what it changes and
``params.yaml`` is these defaults written out for DVC to track
(``python -m pipeline.config --dump``). Dotted overrides ``train.lr=3e-4`` are parsed as
YAML. An unknown key, a wrong type or an out-of-range value raises ``ConfigError`` naming
the key before any stage does work.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError


class Section(BaseModel):
    # extra="forbid" is what turns a typo into an error instead of a silently ignored key.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Paths(Section):
    """Where outputs go. Everything but ``work_dir`` is relative to ``work_dir``."""

    work_dir: str = "work"
    competition: str = "competition"
    cache: str = "cache"
    eda: str = "reports/eda"
    folds: str = "folds.csv"
    tuning: str = "tuning"
    models: str = "models"
    oof: str = "oof"
    preds: str = "preds"
    metrics: str = "metrics"
    plots: str = "plots"
    ensemble: str = "ensemble"
    submissions: str = "submissions"


class Data(Section):
    """The competition folder and how its images become tensors."""

    source: Literal["elpv", "folder"] = "elpv"
    layout: Literal["csv", "subfolders", "mask"] = "csv"
    dir: str | None = None
    train_csv: str = "train.csv"
    train_images: str = "train"
    test_images: str = "test"
    sample_submission: str = "sample_submission.csv"
    solution: str = "solution.csv"
    id_col: str | None = None
    target_col: str | None = None
    path_col: str | None = None
    group_col: str | None = None
    head_cols: list[str] = Field(default_factory=list)
    compose: str | None = None
    aux_cols: list[str] = Field(default_factory=list)
    image_size: int | list[int] = 96
    channels: Literal[1, 3] = 1
    max_train: int | None = Field(default=None, gt=0)
    elpv_size: int | None = Field(default=None, gt=0)
    elpv_test_fraction: float = Field(default=0.2, gt=0, lt=1)
    elpv_seed: int = 0
    workers: int = Field(default=0, ge=0)

    @field_validator("image_size")
    @classmethod
    def _positive_size(cls, value):
        sizes = [value] if isinstance(value, int) else value
        if len(sizes) not in (1, 2) or any(s <= 0 for s in sizes):
            raise ValueError("must be a positive int or a [height, width] pair of positive ints")
        return value

    @field_validator("compose")
    @classmethod
    def _compose_parses(cls, value):
        if value is not None:
            check_formula(value)
        return value

    @model_validator(mode="after")
    def _folder_needs_dir(self):
        if self.source == "folder" and not self.dir:
            raise ValueError("data.dir is required when data.source is 'folder'")
        if self.compose and not self.head_cols:
            raise ValueError("data.compose needs data.head_cols (the columns it is composed from)")
        return self

    @property
    def size_hw(self) -> tuple[int, int]:
        if isinstance(self.image_size, int):
            return self.image_size, self.image_size
        return (self.image_size[0], self.image_size[-1])


class Folds(Section):
    n_splits: int = Field(default=5, ge=2)
    seed: int = 42


class Train(Section):
    """One backbone's k-fold training."""

    epochs: int = Field(default=15, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=0.05, ge=0)
    optimizer: Literal["adamw", "sgd", "adam", "lamb", "adan", "rmsprop"] = "adamw"
    momentum: float = Field(default=0.9, ge=0, lt=1)
    scheduler: Literal["cosine", "step", "plateau", "onecycle", "none"] = "cosine"
    warmup_epochs: float = Field(default=1.0, ge=0)
    step_size: int = Field(default=5, ge=1)
    step_gamma: float = Field(default=0.1, gt=0, le=1)
    augment: str = "flips"
    mixup: float = Field(default=0.0, ge=0)
    cutmix: float = Field(default=0.0, ge=0)
    mix_prob: float = Field(default=1.0, ge=0, le=1)
    pretrained: bool = False
    pretrained_file: str | None = None
    drop_rate: float = Field(default=0.1, ge=0, lt=1)
    drop_path_rate: float = Field(default=0.0, ge=0, lt=1)
    freeze_epochs: int = Field(default=0, ge=0)
    backbone_lr_mult: float = Field(default=1.0, gt=0)
    loss: str = "ce"
    label_smoothing: float = Field(default=0.05, ge=0, lt=1)
    focal_gamma: float = Field(default=2.0, ge=0)
    focal_alpha: float | list[float] | None = None
    class_weights: bool = False
    oversample: bool = True
    balance_power: float = Field(default=0.5, ge=0, le=1)
    aux_weight: float = Field(default=0.3, ge=0)
    accumulate: int = Field(default=1, ge=1)
    grad_clip: float | None = Field(default=None, gt=0)
    amp: Literal["auto", "off", "fp16", "bf16"] = "auto"
    channels_last: bool = True
    ema: bool = False
    ema_decay: float = Field(default=0.998, gt=0, lt=1)
    compile: bool = False
    metric: str = "macro_f1"
    patience: int | None = Field(default=None, ge=1)
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int | Literal["auto"] = "auto"
    use_tuned: bool = True
    folds: list[int] | None = None


class TuneParam(Section):
    """One dimension of the search space."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _complete(self):
        if self.type == "categorical" and not self.choices:
            raise ValueError("a categorical parameter needs 'choices'")
        if self.type != "categorical" and (self.low is None or self.high is None):
            raise ValueError(f"a {self.type} parameter needs 'low' and 'high'")
        return self


def _default_space() -> dict[str, TuneParam]:
    return {
        "lr": TuneParam(type="float", low=2e-3, high=1.2e-2, log=True),
        "weight_decay": TuneParam(type="float", low=1e-3, high=0.1, log=True),
        "label_smoothing": TuneParam(type="float", low=0.0, high=0.1),
        "drop_rate": TuneParam(type="float", low=0.0, high=0.3),
    }


class Tune(Section):
    enabled: bool = True
    n_trials: int = Field(default=4, ge=0)
    timeout: float | None = Field(default=None, gt=0)
    epochs: int = Field(default=4, ge=1)
    folds: list[int] = Field(default_factory=lambda: [0])
    pruner: Literal["median", "hyperband", "wilcoxon", "none"] = "median"
    storage: str | None = None
    seed: int = 0
    max_train: int | None = Field(default=None, gt=0)
    min_gain: float = Field(default=0.02, ge=0)
    space: dict[str, TuneParam] = Field(default_factory=_default_space)
    heartbeat: int = Field(default=60, ge=1)


class Infer(Section):
    tta: list[str] = Field(default_factory=lambda: ["hflip", "vflip"])
    merge: Literal["mean", "gmean"] = "mean"
    batch_size: int = Field(default=128, ge=1)
    checkpoint: Literal["best", "last"] = "best"


class Ensemble(Section):
    method: str = "auto"
    methods: list[str] = Field(
        default_factory=lambda: ["soft", "weighted", "hard", "geometric", "rank", "caruana", "stacking"])
    class_offsets: bool = False


class Submit(Section):
    kind: Literal["label", "proba"] = "label"
    upload: bool = False
    competition: str | None = None
    message: str = "pipeline submission"


class Config(Section):
    paths: Paths = Field(default_factory=Paths)
    data: Data = Field(default_factory=Data)
    folds: Folds = Field(default_factory=Folds)
    # Backbone name -> its own train overrides ({} for none). A plain list of names is accepted too.
    # A mapping lets DVC track each backbone's parameters apart (`backbones.<name>`), so changing
    # one re-runs that backbone's stages only.
    backbones: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"lcnet_050": {"lr": 0.006}, "mobilenetv3_small_050": {}})
    train: Train = Field(default_factory=Train)
    tune: Tune = Field(default_factory=Tune)
    infer: Infer = Field(default_factory=Infer)
    ensemble: Ensemble = Field(default_factory=Ensemble)
    submit: Submit = Field(default_factory=Submit)

    @field_validator("backbones", mode="before")
    @classmethod
    def _backbone_mapping(cls, value):
        if isinstance(value, list):
            names = [str(v) for v in value]
            if len(set(names)) != len(names):
                raise ValueError("a backbone is listed twice")
            value = {name: {} for name in names}
        if not value:
            raise ValueError("list at least one timm backbone")
        if isinstance(value, dict):
            value = {name: overrides or {} for name, overrides in value.items()}
        return value

    @model_validator(mode="after")
    def _backbone_overrides_are_train_keys(self):
        for name, overrides in self.backbones.items():
            unknown = [key for key in overrides if key not in Train.model_fields]
            if unknown:
                close = difflib.get_close_matches(unknown[0], list(Train.model_fields), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"backbones.{name} sets unknown train key(s) {unknown}{hint} "
                                 f"(valid: {', '.join(Train.model_fields)})")
            try:
                Train.model_validate({**self.train.model_dump(), **overrides})
            except ValidationError as error:
                first = error.errors()[0]
                raise ValueError(f"backbones.{name}.{first['loc'][0]}: {first['msg']}") from None
        return self

    def for_backbone(self, name: str) -> Config:
        """This config with ``backbones.<name>``'s train overrides applied."""
        overrides = self.backbones.get(name) or {}
        if not overrides:
            return self
        data = self.model_dump()
        data["train"].update(overrides)
        return Config.model_validate(data)

    def path(self, name: str) -> Path:
        """An output path from the ``paths`` section, resolved under the work directory."""
        work_dir = Path(self.paths.work_dir)
        return work_dir if name == "work_dir" else work_dir / getattr(self.paths, name)


# ---------------------------------------------------------------- formula for composed heads

_ALLOWED_NODES = (ast.Expression, ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.Name, ast.Load,
                  ast.Constant, ast.FloorDiv, ast.Mod)


def check_formula(formula: str) -> set[str]:
    """Parse an integer formula such as ``mask*6 + gender*3 + age``; return its names."""
    try:
        tree = ast.parse(formula, mode="eval")
    except SyntaxError as error:
        raise ValueError(f"cannot parse formula {formula!r}: {error.msg}") from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            raise ValueError(f"formula {formula!r} may use only names, integers, + - * // %")
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}


def eval_formula(formula: str, values: dict[str, int]) -> int:
    """Evaluate a checked formula on integer head values."""
    check_formula(formula)
    return int(eval(compile(formula, "<compose>", "eval"), {"__builtins__": {}}, dict(values)))


# ---------------------------------------------------------------- loading

def parse_overrides(overrides: list[str]) -> dict:
    """``["train.lr=1e-3", "backbones=[a,b]"]`` -> a nested dict, values parsed as YAML."""
    nested: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return nested


def deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "space":
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _valid_keys(model: type[BaseModel], location: tuple) -> list[str]:
    for part in location[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None) if field else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return []
    return list(model.model_fields)


def _explain(error: ValidationError, source: str) -> ConfigError:
    lines = []
    for item in error.errors():
        location = tuple(p for p in item["loc"] if not str(p).startswith(("function-", "literal[")))
        key = ".".join(str(p) for p in location) or "(top level)"
        if item["type"] == "extra_forbidden":
            valid = _valid_keys(Config, location)
            close = difflib.get_close_matches(str(location[-1]), valid, n=1)
            hint = f"; did you mean '{'.'.join([*map(str, location[:-1]), close[0]])}'?" if close else ""
            lines.append(f"unknown key '{key}'{hint} (valid keys here: {', '.join(valid)})")
        else:
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"'{key}': {message} (got {item.get('input')!r})")
    return ConfigError(f"invalid config {source}:\n  " + "\n  ".join(lines))


def load_config(path: str | Path | None = "params.yaml", overrides: list[str] | tuple = ()) -> Config:
    """Read a YAML config (None: the defaults), apply dotted overrides, validate."""
    raw: dict = {}
    source = "(defaults)"
    if path is not None:
        source = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    raw = deep_merge(raw, parse_overrides(list(overrides)))
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise _explain(error, source) from None


def dump(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json", exclude_none=False), sort_keys=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Validate a config and print it resolved.")
    parser.add_argument("--config", default="params.yaml")
    parser.add_argument("--dump", action="store_true", help="print the defaults (for params.yaml)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        config = load_config(None if args.dump else args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(dump(config), end="")


if __name__ == "__main__":
    main()
