"""The CV of averaging whole runs: several runs' OOF probabilities, equal weights, nothing fit.

    python benchmarks/blend_runs.py WORK/folds.csv RUN1/oof/lcnet_050.parquet RUN2/oof/lcnet_050.parquet [...]

A seed ensemble's figure from runs that already exist (the same recipe on other ``train.seed`` values, or other
recipes), on the folds of ``folds.csv`` (id, label, fold). Per run and for the average it prints the CV (mean ± std,
population, of the folds' scores, as train reports it) and the OOF accuracy. Equal weights are fit on nothing, so the
average's CV is as honest as its members' (each member's own epoch pick included). No test label is read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import metrics  # noqa: E402
from pipeline.artifacts import read_text_csv  # noqa: E402
from pipeline.errors import DataError  # noqa: E402


def fold_cv(labels: np.ndarray, proba: np.ndarray, folds: np.ndarray, metric: str) -> tuple[float, float]:
    """Mean and std (population, as train's) over folds of ``metric``: integer labels, N x C probabilities."""
    scores = [metrics.score(metric, labels[folds == fold], proba[folds == fold]) for fold in np.unique(folds)]
    return float(np.mean(scores)), float(np.std(scores))


def aligned(folds: pd.DataFrame, oofs: list[pd.DataFrame]) -> tuple[list[str], np.ndarray, np.ndarray, list]:
    """(class names, integer labels, fold per row, each run's N x C probabilities), in folds.csv's id order."""
    classes = [column for column in oofs[0].columns if column not in ("id", "fold")]
    ids = folds["id"].astype(str)
    probabilities = []
    for index, oof in enumerate(oofs):
        by_id = oof.assign(id=oof["id"].astype(str)).set_index("id")
        missing = sorted(set(ids) - set(by_id.index))
        if missing or list(by_id.columns.drop("fold", errors="ignore")) != classes:
            raise DataError(f"run {index + 1} lacks ids {missing[:5]} or has other classes than run 1")
        probabilities.append(by_id.loc[ids, classes].to_numpy(dtype=float))
    labels = folds["label"].astype(str).map({name: i for i, name in enumerate(classes)}).to_numpy()
    return classes, labels, folds["fold"].to_numpy(), probabilities


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folds", type=Path, help="a work directory's folds.csv (id, label, fold)")
    parser.add_argument("oofs", nargs="+", type=Path, help="oof/<backbone>.parquet of each run, on those folds")
    parser.add_argument("--metric", default="macro_f1")
    args = parser.parse_args()
    try:  # ids and labels as their exact text, as the pipeline reads folds.csv
        folds_table = read_text_csv(args.folds, "folds file", "the folds stage").astype({"fold": int})
        _, labels, folds, probabilities = aligned(folds_table, [pd.read_parquet(path) for path in args.oofs])
    except DataError as error:
        print(f"blend_runs: {error}", file=sys.stderr)
        sys.exit(2)
    rows = [(str(path), proba) for path, proba in zip(args.oofs, probabilities)]
    rows.append((f"average of the {len(rows)}", np.mean(probabilities, axis=0)))
    print(f"| run | CV {args.metric} (mean ± std of folds) | OOF accuracy |")
    print("|---|---|---|")
    for name, proba in rows:
        mean, std = fold_cv(labels, proba, folds, args.metric)
        print(f"| {name} | {mean:.4f} ± {std:.4f} | {metrics.score('accuracy', labels, proba):.4f} |")


if __name__ == "__main__":
    main()
