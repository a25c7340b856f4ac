"""Every artifact path, named once.

The ``paths`` section of the config names the folders (under ``paths.work_dir``, but for the
team's record: ``paths.submissions`` and ``paths.metrics``, at the top level and tracked by git for the run DVC
tracks, so that ``dvc exp show`` sees the metrics, and under ``work_dir`` for any other run, so that a side run
never overwrites them: ``Config.record_at_top_level``); this module names the files in them. Stages ask here for every
path they read or write, and ``tests/test_layout.py`` checks that ``dvc.yaml``'s deps and outs are
exactly these paths, so a file name is never spelled in two places that could drift apart.

Files written inside a temporary folder first (the cache, the EDA report) are named by the
constants below, joined onto that folder by the writer.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

from pipeline.config import EMBED_MEMBER, FEATURES_MEMBER, Config, Paths  # noqa: F401 (the members re-exported)

# Inside the image cache (prepare writes them into a temporary folder, then renames it).
CACHE_META = "meta.json"
CACHE_STATS = "stats.json"
CACHE_SAMPLE_SUBMISSION = "sample_submission.csv"
CACHE_SOLUTION = "solution.csv"
EDA_REPORT = "report.md"
EDA_SUMMARY = "eda.json"
EDA_FIGURES = "figures"  # the report's PNGs, a folder of their own: what `dvc plots show` shows of the EDA
# Inside a fold's model folder.
FOLD_DONE = "done.json"
FOLD_VALIDATION = "validation.npy"
FOLD_LAST = "last.pt"
FOLD_PSEUDO_LABELS = "pseudo_labels.csv"  # in a pseudo-label round's fold folder: the test images it took
# Inside the folder of a member that trains no network (features, embed): its OOF and test tables, and what the
# folder holds instead when the member is disabled.
MEMBER_OOF, MEMBER_TEST, MEMBER_NOTE = "oof.parquet", "test.parquet", "disabled.txt"
FEATURES_OOF, FEATURES_TEST, FEATURES_NOTE = MEMBER_OOF, MEMBER_TEST, MEMBER_NOTE
EMBED_OOF, EMBED_TEST, EMBED_NOTE = MEMBER_OOF, MEMBER_TEST, MEMBER_NOTE
# Such a member's per-fold standardisation and logistic regression (and the features member's filters), with what
# its features need (embed: backbones, image size, normalisation): what the code-competition kernel predicts new
# images with (training/embedding.py's .npz).
MEMBER_REGRESSIONS = "regressions.npz"
FEATURES_REGRESSIONS = EMBED_REGRESSIONS = MEMBER_REGRESSIONS
# Inside the ensemble folder.
ENSEMBLE_OOF = "oof.parquet"
ENSEMBLE_TEST = "test.parquet"
ENSEMBLE_WEIGHTS = "weights.json"
ENSEMBLE_REPORT = "report.md"
ENSEMBLE_TABLE = "report.csv"
ENSEMBLE_CORRELATION = "correlation.png"
# Inside the metrics folder (beside one `<backbone>.json` per backbone).
ENSEMBLE_SCORES = "ensemble.json"
SUBMISSION_SCORES = "submission.json"

STAGES = ("prepare", "eda", "folds", "tune", "train", "infer", "features", "embed", "ensemble", "submit")
PER_BACKBONE = ("tune", "train", "infer")  # dvc.yaml's foreach stages over `backbones`


def slug(name: str) -> str:
    """A backbone or method name as a file-name-safe string."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def work_dir(cfg: Config) -> Path:
    return Path(cfg.paths.work_dir)


def _under(cfg: Config, name: str) -> Path:
    """A folder or file that the ``paths`` section names, under the work directory (or at the top level)."""
    return cfg.path(name)


def overrides_under(folder: str | Path) -> list[str]:
    """Dotted overrides that put every output under ``folder``, the run's record included (tests, benchmarks)."""
    return [f"paths.work_dir={folder}", "paths.record=run"]


def logs_dir(cfg: Config) -> Path:
    return _under(cfg, "logs")


def log_file(cfg: Config, stage: str, backbone: str | None, started: datetime) -> Path:
    """A stage run's log: ``<stage>[-<backbone>]-<UTC YYYYmmdd-HHMMSS>.log``."""
    parts = [stage, *([slug(backbone)] if backbone else []), f"{started:%Y%m%d-%H%M%S}"]
    return logs_dir(cfg) / ("-".join(parts) + ".log")


# ---------------------------------------------------------------- prepare, eda, folds

def competition_dir(cfg: Config) -> Path:
    """Where the embedded ELPV competition is built (a folder competition is read where it is)."""
    return _under(cfg, "competition")


def kaggle_competition_dir(cfg: Config) -> Path:
    """Where ``data.source: kaggle`` unzips ``data.competition``: ``<paths.competition>/<name>/``."""
    return competition_dir(cfg) / slug(cfg.data.competition or "")


def cache_dir(cfg: Config) -> Path:
    return _under(cfg, "cache")


def cache_stamp(cfg: Config) -> Path:
    """prepare's note of the image files' sizes and times when it last found the cache current: beside the
    cache, not in it, so that what DVC tracks and shares is the same on every machine."""
    folder = cache_dir(cfg)
    return folder.with_name(f".{folder.name}.stamp.json")


def cache_images_name(split: str, size_hw: tuple[int, int] | None = None) -> str:
    """A split's cached images: ``train.npy`` at ``data.image_size``, ``train_224x224.npy`` at another size."""
    return f"{split}.npy" if size_hw is None else f"{split}_{size_hw[0]}x{size_hw[1]}.npy"


def cache_extra_sizes(cfg: Config) -> list[tuple[int, int]]:
    """The sizes the cache holds beside ``data.image_size``: the embed stage's, when it runs and differs."""
    size = (cfg.embed.image_size, cfg.embed.image_size)
    return [size] if cfg.embed.enabled and size != cfg.data.size_hw else []


def cache_index_name(split: str) -> str:
    return f"{split}.parquet"


def cache_index(cfg: Config, split: str) -> Path:
    """The table of a split's cached images (id, path, target, group, head and aux columns)."""
    return cache_dir(cfg) / cache_index_name(split)


def eda_dir(cfg: Config) -> Path:
    return _under(cfg, "eda")


def eda_figures_dir(cfg: Config) -> Path:
    return eda_dir(cfg) / EDA_FIGURES


def folds_file(cfg: Config) -> Path:
    return _under(cfg, "folds")


def folds_balance_file(cfg: Config) -> Path:
    """Images per class and fold, for a look at the split."""
    return _under(cfg, "folds_balance")


# ---------------------------------------------------------------- tune, train, infer (per backbone)

def tuning_dir(cfg: Config, backbone: str) -> Path:
    return _under(cfg, "tuning") / slug(backbone)


def tuning_plots_dir(cfg: Config, backbone: str) -> Path:
    """Optuna's plots of a backbone's study (history, importances, ...), for ``dvc plots show``."""
    return _under(cfg, "plots") / "tuning" / slug(backbone)


def best_params_file(cfg: Config, backbone: str) -> Path:
    return tuning_dir(cfg, backbone) / "best_params.yaml"


def optuna_journal(cfg: Config) -> Path:
    """The default Optuna storage: one journal file shared by every backbone's study."""
    return _under(cfg, "tuning") / "optuna.journal"


def model_dir(cfg: Config, backbone: str) -> Path:
    return _under(cfg, "models") / slug(backbone)


def fold_dir(cfg: Config, backbone: str, fold: int) -> Path:
    return model_dir(cfg, backbone) / f"fold{fold}"


def refit_dir(cfg: Config, backbone: str) -> Path:
    """The full-data model of ``train.refit`` (beside the fold folders, inside the models folder)."""
    return model_dir(cfg, backbone) / "refit"


def pseudo_dir(cfg: Config, backbone: str) -> Path:
    """The second round's fold folders of ``train.pseudo_label`` (``pseudo/fold<k>``, inside the models folder)."""
    return model_dir(cfg, backbone) / "pseudo"


def pseudo_fold_dir(cfg: Config, backbone: str, fold: int) -> Path:
    return pseudo_dir(cfg, backbone) / fold_dir(cfg, backbone, fold).name


def checkpoint_name(which: str) -> str:
    """``best`` or ``last`` -> the checkpoint's file name in a fold folder."""
    return f"{which}.pt"


def oof_file(cfg: Config, backbone: str) -> Path:
    return _under(cfg, "oof") / f"{slug(backbone)}.parquet"


def metrics_dir(cfg: Config) -> Path:
    """The metrics folder that ``dvc metrics show`` and ``dvc exp show`` read (top level for the run DVC tracks)."""
    return _under(cfg, "metrics")


def train_metrics_file(cfg: Config, backbone: str) -> Path:
    return metrics_dir(cfg) / f"{slug(backbone)}.json"


def fold_curves_dir(cfg: Config, backbone: str) -> Path:
    """The folds' per-epoch curves of a backbone for ``dvc plots show``: one TSV per metric (epoch, fold, value),
    drawn with the folds overlaid by the ``fold_curves`` template (``.dvc/plots/fold_curves.json``)."""
    return _under(cfg, "plots") / "curves" / slug(backbone)


def fold_logs_dir(cfg: Config, logger: str, backbone: str, fold: int | None = None) -> Path:
    """A training logger's folder (``dvclive``, ``tensorboard``) for a backbone, or for one of its folds."""
    folder = logs_dir(cfg) / logger / slug(backbone)
    return folder if fold is None else folder / f"fold{fold}"


def wandb_dir(cfg: Config) -> Path:
    """The folder the wandb logger makes its ``wandb/`` run folders in (``wandb.init(dir=...)``)."""
    return logs_dir(cfg)


def confusion_file(cfg: Config, backbone: str) -> Path:
    return _under(cfg, "plots") / f"confusion_{slug(backbone)}.png"


def preds_file(cfg: Config, backbone: str) -> Path:
    return _under(cfg, "preds") / f"{slug(backbone)}.parquet"


def preds_oof_file(cfg: Config, backbone: str) -> Path:
    return _under(cfg, "preds") / f"{slug(backbone)}_oof.parquet"


def tta_file(cfg: Config, backbone: str) -> Path:
    return _under(cfg, "preds") / f"{slug(backbone)}_tta.csv"


# ---------------------------------------------------------------- ensemble, submit

def features_dir(cfg: Config) -> Path:
    return _under(cfg, "features")


def features_metrics_file(cfg: Config) -> Path:
    return metrics_dir(cfg) / f"{FEATURES_MEMBER}.json"


def embed_dir(cfg: Config) -> Path:
    return _under(cfg, "embed")


def embed_metrics_file(cfg: Config) -> Path:
    return metrics_dir(cfg) / f"{EMBED_MEMBER}.json"


def ensemble_dir(cfg: Config) -> Path:
    return _under(cfg, "ensemble")


def ensemble_scores_file(cfg: Config) -> Path:
    """The ensemble's OOF scores and chosen method (DVC metrics; submit reads the method and CV here)."""
    return metrics_dir(cfg) / ENSEMBLE_SCORES


def submissions_dir(cfg: Config) -> Path:
    return _under(cfg, "submissions")


def leaderboard_file(cfg: Config) -> Path:
    return submissions_dir(cfg) / "leaderboard.csv"


def latest_submission_file(cfg: Config) -> Path:
    return submissions_dir(cfg) / "submission.csv"


def submission_metrics_file(cfg: Config) -> Path:
    return metrics_dir(cfg) / SUBMISSION_SCORES


def cv_lb_table(cfg: Config) -> Path:
    """Every submission's CV beside its Public leaderboard score: a DVC plot (submit and ``pipeline.kaggle``)."""
    return metrics_dir(cfg) / "cv_vs_lb.csv"


def cv_lb_figure(cfg: Config) -> Path:
    return metrics_dir(cfg) / "cv_vs_lb.png"


def kaggle_package_dir(cfg: Config) -> Path:
    """The code-competition package (``pipeline.kaggle_package``): ``dataset/`` and ``kernel/``, for the kaggle CLI."""
    return work_dir(cfg) / "kaggle"


# ---------------------------------------------------------------- what each stage reads and writes (dvc.yaml's)

def stage_inputs(cfg: Config, stage: str, backbone: str | None = None) -> list[Path]:
    """The artifacts a stage reads, its data deps in ``dvc.yaml`` (prepare reads the competition folder, ``data.*``)."""
    cache, folds = cache_dir(cfg), folds_file(cfg)
    table = {
        "prepare": lambda: [],
        "eda": lambda: [cache],
        "folds": lambda: [cache_index(cfg, "train")],
        "tune": lambda: [cache, folds],
        "train": lambda: [cache, folds, tuning_dir(cfg, backbone)],
        "infer": lambda: [model_dir(cfg, backbone), cache, folds, tuning_dir(cfg, backbone)],
        "features": lambda: [cache, folds],
        "embed": lambda: [cache, folds],
        "ensemble": lambda: [_under(cfg, "preds"), _under(cfg, "oof"), features_dir(cfg), embed_dir(cfg), folds, cache],
        "submit": lambda: [ensemble_dir(cfg) / ENSEMBLE_TEST, ensemble_scores_file(cfg),
                           ensemble_dir(cfg) / ENSEMBLE_WEIGHTS, cache],
    }
    return table[stage]()


def stage_outputs(cfg: Config, stage: str, backbone: str | None = None) -> list[Path]:
    """The outs, metrics and plots ``dvc.yaml`` declares for a stage (``backbone`` for the per-backbone ones)."""
    ensemble = ensemble_dir(cfg)
    table = {
        "prepare": lambda: [cache_dir(cfg)],
        "eda": lambda: [eda_dir(cfg)],
        "folds": lambda: [folds_file(cfg), folds_balance_file(cfg)],
        "tune": lambda: [tuning_dir(cfg, backbone), tuning_plots_dir(cfg, backbone)],
        "train": lambda: [model_dir(cfg, backbone), oof_file(cfg, backbone), fold_curves_dir(cfg, backbone),
                          confusion_file(cfg, backbone), train_metrics_file(cfg, backbone)],
        "infer": lambda: [preds_file(cfg, backbone), preds_oof_file(cfg, backbone), tta_file(cfg, backbone)],
        "features": lambda: [features_dir(cfg), features_metrics_file(cfg)],
        "embed": lambda: [embed_dir(cfg), embed_metrics_file(cfg)],
        "ensemble": lambda: [*(ensemble / name for name in (ENSEMBLE_OOF, ENSEMBLE_TEST, ENSEMBLE_WEIGHTS,
                                                            ENSEMBLE_REPORT, ENSEMBLE_TABLE, ENSEMBLE_CORRELATION)),
                             ensemble_scores_file(cfg)],
        "submit": lambda: [submissions_dir(cfg), submission_metrics_file(cfg), cv_lb_table(cfg), cv_lb_figure(cfg)],
    }
    return table[stage]()
