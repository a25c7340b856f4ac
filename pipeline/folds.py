"""Stage folds: assign every training image to a cross-validation fold.

Reads:  ``paths.cache``/train.parquet (ids, labels, groups from prepare).
Writes: ``paths.folds`` (id, label, group, fold) and ``paths.folds`` with ``_balance.csv``
        (images per class per fold).

StratifiedKFold keeps each class's share equal across folds; with ``data.group_col`` set
(or a layout with groups, like the mask competition's persons) StratifiedGroupKFold keeps
each group inside one fold, so a person's photos never straddle train and validation and
the CV score does not flatter the model.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from pipeline import cli, layout
from pipeline.artifacts import read_table, write_csv
from pipeline.config import Config
from pipeline.errors import DataError


def assign_folds(labels, n_splits: int, seed: int, groups=None) -> np.ndarray:
    """Fold index (0..n_splits-1) for each row; stratified on ``labels``, group-aware when ``groups`` is given."""
    labels = np.asarray(labels)
    counts = pd.Series(labels).value_counts()
    if counts.min() < n_splits:
        small = {str(name): int(count) for name, count in counts[counts < n_splits].items()}
        raise DataError(f"folds.n_splits={n_splits} but class(es) {small} have fewer images than folds: "
                        f"lower folds.n_splits to at most {counts.min()} or add images")
    folds = np.full(len(labels), -1, dtype=int)
    if groups is None:
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(len(labels)), labels)
    else:
        groups = np.asarray(groups)
        if len(np.unique(groups)) < n_splits:
            raise DataError(f"folds.n_splits={n_splits} but there are only {len(np.unique(groups))} groups: "
                            f"lower folds.n_splits to at most {len(np.unique(groups))} or check data.group_col")
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(len(labels)), labels, groups)
    for fold, (_, validation) in enumerate(splits):
        folds[validation] = fold
    return folds


def split_problems(labels, folds, groups=None) -> list[str]:
    """What is wrong with a fold assignment: a group in several folds, a class missing from a fold's
    validation images. Empty when the split is sound."""
    frame = pd.DataFrame({"label": np.asarray(labels).astype(str), "fold": np.asarray(folds)})
    problems = []
    if groups is not None:
        frame["group"] = np.asarray(groups).astype(str)
        spread = frame.groupby("group")["fold"].nunique()
        for group in spread[spread > 1].index[:10]:
            where = sorted(frame.loc[frame["group"] == group, "fold"].unique().tolist())
            problems.append(f"group {group!r} is in folds {where}")
    present = pd.crosstab(frame["label"], frame["fold"])
    for label, fold in zip(*np.nonzero(present.to_numpy() == 0)):
        problems.append(f"class {present.index[label]!r} has no image in fold {present.columns[fold]}")
    return problems


def balance_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Images per class (rows) and fold (columns), with totals."""
    table = pd.crosstab(frame["label"], frame["fold"], margins=True, margins_name="total")
    table.columns = [f"fold{c}" if c != "total" else c for c in table.columns]
    return table


def main(cfg: Config) -> dict:
    train = read_table(layout.cache_index(cfg, "train"), "image cache index", "prepare")
    groups = train["group"].to_numpy() if "group" in train.columns else None
    folds = assign_folds(train["target"], cfg.folds.n_splits, cfg.folds.seed, groups)
    problems = split_problems(train["target"], folds, groups)
    if problems:  # StratifiedGroupKFold cannot always put every class in every fold when groups are few
        raise DataError(f"the {cfg.folds.n_splits}-fold split is unsound, nothing was written: " + "; ".join(problems)
                        + ". Lower folds.n_splits or try another folds.seed")
    frame = pd.DataFrame({"id": train["id"], "label": train["target"],
                          "group": groups if groups is not None else train["id"], "fold": folds})
    table = balance_table(frame)
    write_csv(layout.folds_file(cfg), frame)
    write_csv(layout.folds_balance_file(cfg), table.reset_index())
    kind = "StratifiedGroupKFold" if groups is not None else "StratifiedKFold"
    print(f"folds: {kind}, {cfg.folds.n_splits} folds, seed {cfg.folds.seed}\n{table.to_string()}", file=sys.stderr)
    return {"n_splits": cfg.folds.n_splits, "sizes": frame["fold"].value_counts().sort_index().tolist()}


if __name__ == "__main__":
    cli.run(main, "Assign stratified (group-aware) cross-validation folds.")
