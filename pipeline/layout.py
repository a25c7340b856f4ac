"""Every artifact path, named once.

The ``paths`` section of the config names the folders (under ``paths.work_dir``); this
module names the files in them. Stages ask here for every path they read or write, and
``tests/test_layout.py`` checks that ``dvc.yaml``'s deps and outs are exactly these paths, so
a file name is never spelled in two places that could drift apart.

Files written inside a temporary folder first (the cache, the EDA report) are named by the
constants below, joined onto that folder by the writer.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.config import Config

# Inside the image cache (prepare writes them into a temporary folder, then renames it).
CACHE_META = "meta.json"
CACHE_STATS = "stats.json"
CACHE_SAMPLE_SUBMISSION = "sample_submission.csv"
CACHE_SOLUTION = "solution.csv"
EDA_REPORT = "report.md"
EDA_SUMMARY = "eda.json"
# Inside a fold's model folder.
FOLD_DONE = "done.json"
FOLD_VALIDATION = "validation.npy"
FOLD_LAST = "last.pt"
# Inside the ensemble folder.
ENSEMBLE_OOF = "oof.parquet"
ENSEMBLE_TEST = "test.parquet"
ENSEMBLE_WEIGHTS = "weights.json"
ENSEMBLE_SCORES = "scores.json"
ENSEMBLE_REPORT = "report.md"
ENSEMBLE_TABLE = "report.csv"
ENSEMBLE_CORRELATION = "correlation.png"


def slug(name: str) -> str:
    """A backbone or method name as a file-name-safe string."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def work_dir(cfg: Config) -> Path:
    return Path(cfg.paths.work_dir)


def _under(cfg: Config, name: str) -> Path:
    """A folder or file that the ``paths`` section names, under the work directory."""
    return cfg.path(name)


# ---------------------------------------------------------------- prepare, eda, folds

def competition_dir(cfg: Config) -> Path:
    """Where the embedded ELPV competition is built (a folder competition is read where it is)."""
    return _under(cfg, "competition")


def cache_dir(cfg: Config) -> Path:
    return _under(cfg, "cache")


def cache_images_name(split: str) -> str:
    return f"{split}.npy"


def cache_index_name(split: str) -> str:
    return f"{split}.parquet"


def cache_index(cfg: Config, split: str) -> Path:
    """The table of a split's cached images (id, path, target, group, head and aux columns)."""
    return cache_dir(cfg) / cache_index_name(split)


def eda_dir(cfg: Config) -> Path:
    return _under(cfg, "eda")


def folds_file(cfg: Config) -> Path:
    return _under(cfg, "folds")


def folds_balance_file(cfg: Config) -> Path:
    """Images per class and fold, for a look at the split."""
    return _under(cfg, "folds_balance")


# ---------------------------------------------------------------- tune, train, infer (per backbone)

def tuning_dir(cfg: Config, backbone: str) -> Path:
    return _under(cfg, "tuning") / slug(backbone)


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


def checkpoint_name(which: str) -> str:
    """``best`` or ``last`` -> the checkpoint's file name in a fold folder."""
    return f"{which}.pt"


def oof_file(cfg: Config, backbone: str) -> Path:
    return _under(cfg, "oof") / f"{slug(backbone)}.parquet"


def train_metrics_file(cfg: Config, backbone: str) -> Path:
    return _under(cfg, "metrics") / f"{slug(backbone)}.json"


def curves_dir(cfg: Config, backbone: str) -> Path:
    """DVCLive's per-epoch curves of a backbone, one subfolder per fold."""
    return _under(cfg, "plots") / "train" / slug(backbone)


def confusion_file(cfg: Config, backbone: str) -> Path:
    return _under(cfg, "plots") / f"confusion_{slug(backbone)}.png"


def preds_file(cfg: Config, backbone: str) -> Path:
    return _under(cfg, "preds") / f"{slug(backbone)}.parquet"


def preds_oof_file(cfg: Config, backbone: str) -> Path:
    return _under(cfg, "preds") / f"{slug(backbone)}_oof.parquet"


def tta_file(cfg: Config, backbone: str) -> Path:
    return _under(cfg, "preds") / f"{slug(backbone)}_tta.csv"


# ---------------------------------------------------------------- ensemble, submit

def ensemble_dir(cfg: Config) -> Path:
    return _under(cfg, "ensemble")


def submissions_dir(cfg: Config) -> Path:
    return _under(cfg, "submissions")


def leaderboard_file(cfg: Config) -> Path:
    return submissions_dir(cfg) / "leaderboard.csv"


def latest_submission_file(cfg: Config) -> Path:
    return submissions_dir(cfg) / "submission.csv"


def submission_metrics_file(cfg: Config) -> Path:
    return _under(cfg, "metrics") / "submission.json"


# ---------------------------------------------------------------- what each stage writes (checked against dvc.yaml)

def stage_outputs(cfg: Config, stage: str, backbone: str | None = None) -> list[Path]:
    """The outs and metrics that ``dvc.yaml`` must declare for a stage (``backbone`` for the per-backbone ones)."""
    ensemble = ensemble_dir(cfg)
    table = {
        "prepare": lambda: [cache_dir(cfg)],
        "eda": lambda: [eda_dir(cfg)],
        "folds": lambda: [folds_file(cfg), folds_balance_file(cfg)],
        "tune": lambda: [tuning_dir(cfg, backbone)],
        "train": lambda: [model_dir(cfg, backbone), oof_file(cfg, backbone), curves_dir(cfg, backbone),
                          confusion_file(cfg, backbone), train_metrics_file(cfg, backbone)],
        "infer": lambda: [preds_file(cfg, backbone), preds_oof_file(cfg, backbone), tta_file(cfg, backbone)],
        "ensemble": lambda: [ensemble / name for name in (ENSEMBLE_OOF, ENSEMBLE_TEST, ENSEMBLE_WEIGHTS,
                                                          ENSEMBLE_REPORT, ENSEMBLE_TABLE, ENSEMBLE_CORRELATION,
                                                          ENSEMBLE_SCORES)],
        "submit": lambda: [submissions_dir(cfg), submission_metrics_file(cfg)],
    }
    return table[stage]()
