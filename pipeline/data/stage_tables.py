"""Reading and checking the tables stages hand to each other: folds.csv and probability tables.

Every reader checks the contract (columns, ids, finite rows that sum to 1) and names the
file, the ids at fault and the stage to re-run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import layout
from pipeline.artifacts import read_table, read_text_csv
from pipeline.config import Config
from pipeline.errors import DataError

# Probabilities written as float32 by a GPU stage sum to 1 only up to ~1e-6; 1e-4 still catches
# a table that was never normalised (logits, or a missing class column).
ROW_SUM_TOLERANCE = 1e-4


def read_folds(cfg: Config) -> pd.DataFrame:
    """folds.csv with ids and labels as their exact text and integer folds."""
    path = layout.folds_file(cfg)
    folds = read_text_csv(path, "folds file", "the folds stage")
    missing = [c for c in ("id", "label", "fold") if c not in folds.columns]
    if missing:
        raise DataError(f"{path} has no column(s) {missing}: re-run the folds stage")
    try:
        folds["fold"] = folds["fold"].astype(int)
    except ValueError:
        raise DataError(f"{path} has a non-integer fold: re-run the folds stage") from None
    return folds


def describe_ids(ids) -> str:
    """The first 10 ids and a count, for error messages."""
    ids = [str(i) for i in ids]
    return f"{len(ids)} id(s) [{', '.join(ids[:10])}{', ...' if len(ids) > 10 else ''}]"


def read_probabilities(path: Path, what: str, class_names: list[str], reference: Path, with_fold: bool) -> pd.DataFrame:
    """A probability table checked against the contract -> id (str), [fold], class columns in class order.

    ``reference`` is the file whose class columns this one must have (the first member's, or
    the cache's meta.json for the first member), named in the error with this file.
    """
    frame = read_table(path, what)
    keys = ["id", "fold"] if with_fold else ["id"]
    missing = [c for c in keys if c not in frame.columns]
    if missing:
        raise DataError(f"{path} has no column(s) {missing}; its columns are {list(frame.columns)}")
    columns = [str(c) for c in frame.columns if c not in keys]
    if sorted(columns) != sorted(class_names):
        raise DataError(f"{path} and {reference} have different class columns: "
                        f"{path.name} has {columns}, {reference.name} has {class_names}")
    frame.columns = [str(c) for c in frame.columns]
    frame["id"] = frame["id"].astype(str)
    duplicated = frame.loc[frame["id"].duplicated(), "id"]
    if len(duplicated):
        raise DataError(f"{path} lists {describe_ids(duplicated.unique())} more than once")
    values = frame[class_names].to_numpy(dtype=float)
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        raise DataError(f"{path} has NaN or infinite probabilities for {describe_ids(frame['id'][bad])}")
    off = np.abs(values.sum(axis=1) - 1.0) > ROW_SUM_TOLERANCE
    if off.any():
        raise DataError(f"{path}: rows do not sum to 1 for {describe_ids(frame['id'][off])} "
                        f"(e.g. {values[off][0].sum():.6f}); re-run the stage that wrote it")
    return frame[keys + class_names]


def check_same_ids(ids, reference_ids, path: Path, reference: Path, fix: str = "") -> None:
    """Raise a DataError naming both files and the ids only one of them holds; ``fix`` says what to re-run."""
    ids, reference_ids = set(ids), set(reference_ids)
    if ids != reference_ids:
        only = [f"{describe_ids(sorted(extra))} only in {where.name}"
                for extra, where in ((ids - reference_ids, path), (reference_ids - ids, reference)) if extra]
        raise DataError(f"{path} and {reference} hold different ids: {', '.join(only)}" + (f"; {fix}" if fix else ""))
