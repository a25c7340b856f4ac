"""The configuration's base section and the sections of the later stages: search, inference, ensembling, submission.

``pipeline.config`` holds the sections of data and training and the whole ``Config``; it re-exports these.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    # extra="forbid" is what turns a typo into an error instead of a silently ignored key; the string under
    # each field is its description (pipeline/reference.py writes docs/configuration.md from them).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class TuneParam(Section):
    """One dimension of the search space."""

    type: Literal["float", "int", "categorical"]
    """The kind of values sampled."""
    low: float | None = None
    """Lower bound (float and int)."""
    high: float | None = None
    """Upper bound (float and int)."""
    log: bool = False
    """Sample on a log scale."""
    step: float | None = None
    """Step between values (optional)."""
    choices: list[Any] | None = None
    """The values of a categorical parameter."""

    @model_validator(mode="after")
    def _complete(self):
        if self.type == "categorical" and not self.choices:
            raise ValueError("a categorical parameter needs 'choices'")
        if self.type != "categorical" and (self.low is None or self.high is None):
            raise ValueError(f"a {self.type} parameter needs 'low' and 'high'")
        return self


class Tune(Section):
    enabled: bool = False
    """Run the search (false: write an empty `best_params.yaml`)."""
    n_trials: int = Field(default=4, ge=0)
    """Trials added per run (0: no search)."""
    timeout: float | None = Field(default=None, gt=0)
    """Stop the search after this many seconds (none: no limit)."""
    epochs: int = Field(default=4, ge=1)
    """Epochs per trial."""
    folds: list[int] = Field(default_factory=lambda: [0])
    """The folds a trial trains and is scored on."""
    pruner: Literal["median", "hyperband", "wilcoxon", "none"] = "median"
    """The Optuna pruner that stops unpromising trials early."""
    storage: str | None = None
    """Optuna storage URL, e.g. PostgreSQL (none: a journal file under `paths.tuning`); `env:NAME` reads it from that
    environment variable, keeping a password out of params.yaml and dvc.lock. Shown and written masked."""
    seed: int = 0
    """Seed of the TPE sampler."""
    max_train: int | None = Field(default=None, gt=0)
    """Train trials on a subsample of this many images (none: all)."""
    min_gain: float = Field(default=0.02, ge=0)
    """The best trial replaces the untuned values only if it beats them by this much of the metric."""
    space: dict[str, TuneParam] = Field(default_factory=lambda: {
        "lr": TuneParam(type="float", low=2e-3, high=1.2e-2, log=True),
        "weight_decay": TuneParam(type="float", low=1e-3, high=0.1, log=True),
        "label_smoothing": TuneParam(type="float", low=0.0, high=0.1),
        "drop_rate": TuneParam(type="float", low=0.0, high=0.3)})
    """The search space: `train.*` key -> its range."""
    heartbeat: int = Field(default=60, ge=1)
    """Seconds between a database worker's heartbeats; a dead worker's trial fails after two."""


class Embed(Section):
    """The embed stage's member: a frozen ImageNet-pretrained backbone's pooled features, a logistic regression per
    fold. One forward pass per image and view, no training of the network: a strong, cheap member on a CPU."""

    enabled: bool = True
    """Add the member to the ensemble (false: the stage writes only a note and the ensemble leaves it out)."""
    backbones: list[str] = Field(default_factory=lambda: ["efficientnet_lite0"], min_length=1)
    """The frozen backbones, their features side by side: a packaged weight (`efficientnet_lite0`, `_lite1`,
    `_lite2`: offline), a path to a weights file as `timm_model=path`, or a timm name (hub weights: the network)."""
    image_size: int = Field(default=224, ge=16)
    """The size the backbones read (prepare caches the images at this size too)."""
    flip: bool = True
    """Average each image's features with its mirror image's (a second forward pass)."""
    inverse_regularisation: float = Field(default=0.03, gt=0)
    """scikit-learn's `C` of the logistic regression: smaller is a stronger L2 penalty."""
    balance_power: float = Field(default=0.5, ge=0, le=1)
    """Class weights `count**-power` in the regression (0: none, 1: balanced)."""
    batch_size: int = Field(default=64, ge=1)
    """Images per forward pass."""


class Infer(Section):
    tta: list[str] = Field(default_factory=lambda: ["hflip", "vflip"])
    """ttach views, combined: `hflip`, `vflip`, `rotate90`, `multiscale`, `brightness`."""
    merge: Literal["mean", "gmean"] = "mean"
    """How TTA views are merged: arithmetic (`mean`) or geometric (`gmean`) mean of probabilities."""
    checkpoint: Literal["best", "last"] = "best"
    """Which checkpoint of each fold predicts."""
    refit_weight: float = Field(default=0.5, ge=0, le=1)
    """With `train.refit`: the full-data model's share of the test probabilities (the folds share the rest)."""


class Features(Section):
    """The features stage's member: k-means patch features of the cached images and a logistic regression per fold."""

    enabled: bool = True
    """Add the member to the ensemble (false: the stage writes only a note and the ensemble leaves it out)."""
    clusters: int = Field(default=256, ge=2)
    """Filters k-means learns for each dictionary (the features an image gets: 13 per filter)."""
    # One dictionary by default: a second of 10-pixel filters every 2 pixels (`patch: [6, 10]`, `stride: [1, 2]`) lifts
    # the member's CV on three ELPV splits but not the soft vote's (docs/study.md, "A second dictionary").
    patch: list[Annotated[int, Field(ge=2)]] = Field(default_factory=lambda: [6], min_length=1)
    """Side of each dictionary's filters, in pixels of the cached images (one number: one dictionary)."""
    stride: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1], min_length=1)
    """Step between the windows each dictionary's filters read (2: a quarter of the time), one per `patch`."""
    threshold: float = Field(default=0.5, ge=0)
    """A filter's response counts above this (whitened units): `max(0, response - threshold)`."""
    patches: int = Field(default=100000, ge=2)
    """Random patches of the training images that k-means learns from."""
    inverse_regularisation: float = Field(default=0.03, gt=0)
    """scikit-learn's `C` of the logistic regression: smaller is a stronger L2 penalty."""
    balance_power: float = Field(default=0.5, ge=0, le=1)
    """Class weights `count**-power` in the regression (0: none, 1: balanced), as `train.balance_power` samples."""
    seed: int = 0
    """Seed of the patch sample and of k-means."""

    @field_validator("patch", "stride", mode="before")
    @classmethod
    def _one_number_is_one_dictionary(cls, value):
        return [value] if isinstance(value, (int, str)) else value

    @model_validator(mode="after")
    def _enough_patches(self):
        if len(self.patch) != len(self.stride):
            raise ValueError(f"features.patch {self.patch} and features.stride {self.stride} must list as many "
                             f"values: one patch side and one step per dictionary")
        if self.patches < self.clusters:
            raise ValueError(f"features.patches ({self.patches}) must be at least features.clusters ({self.clusters})")
        return self


class Ensemble(Section):
    # A plain soft vote by default: on three ELPV splits its OOF (nothing fit, so an honest CV) beat `auto`'s nested CV
    # on every split, +0.009 on average (docs/study.md, "A plain soft vote"): choosing among the methods and their
    # offsets on 2,000 rows costs more than it gains. `auto` pays where members differ in strength and rows are many.
    method: str = "soft"
    """The method that makes the submission, or `auto`: the best on OOF (nested CV when there are 3 folds or more)."""
    methods: list[str] = Field(
        default_factory=lambda: ["soft", "weighted", "hard", "geometric", "rank", "caruana", "stacking"])
    """Methods scored on OOF: `soft`, `weighted`, `hard`, `geometric`, `rank`, `caruana`, `stacking`."""
    class_offsets: bool = False
    """Fit per-class log-probability offsets for the metric on OOF (cross-fitted for the OOF score) and apply them to
    test; every method is shifted before `auto` chooses."""


class Submit(Section):
    kind: Literal["label", "proba"] = "label"
    """Submit the class (`label`) or one probability column per class (`proba`)."""
    upload: bool = False
    """Upload the file with the Kaggle CLI."""
    competition: str | None = None
    """The Kaggle competition to upload to."""
    message: str = "pipeline submission"
    """The Kaggle submission message (the CV, the commit and the config digest are appended)."""
    code_competition: bool = False
    """The competition scores a notebook: `upload` pushes the package of `python -m pipeline.kaggle_package` (a
    dataset of the models and a kernel that predicts offline) instead of sending the CSV."""
    kaggle_user: str | None = None
    """The Kaggle user who owns the package's dataset and kernel (required by `kaggle_package`)."""
