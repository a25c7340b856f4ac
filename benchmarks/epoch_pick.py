"""How much keeping each fold's best epoch flatters a CV, read from train's per-epoch validation curves.

    python benchmarks/epoch_pick.py work/plots/curves/lcnet_050/macro_f1.tsv [more curves ...]

Each curve is the ``plots/curves/<backbone>/<metric>.tsv`` train writes (epoch, fold, value). Per file it prints the
CV (mean over folds) of each fold's best epoch, of its last epoch, and the mean ± std (n-1) over folds of the
difference: the optimism of picking the epoch on the rows it is then scored on (``train.keep_epoch: best``), which
``train.keep_epoch: last`` does not have. Nothing is trained and no test label is read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import metrics  # noqa: E402


def pick_optimism(curve: pd.DataFrame, metric: str) -> dict:
    """CV with each fold's best epoch and with its last, and the per-fold differences' mean and std (n-1)."""
    by_fold = curve.sort_values("epoch").groupby("fold")[metric]
    best = by_fold.max() if metrics.greater_is_better(metric) else by_fold.min()
    last = by_fold.last()
    difference = (best - last).abs()
    return {"folds": len(best), "cv_best": float(best.mean()), "cv_last": float(last.mean()),
            "optimism": float(difference.mean()), "optimism_std": float(difference.std(ddof=1))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("curves", nargs="+", type=Path, help="plots/curves/<backbone>/<metric>.tsv files")
    args = parser.parse_args()
    print("| curve | folds | CV with the best epoch | CV with the last epoch | optimism of the pick |")
    print("|---|---|---|---|---|")
    for path in args.curves:
        curve = pd.read_csv(path, sep="\t")
        found = pick_optimism(curve, curve.columns[-1])
        print(f"| {path} | {found['folds']} | {found['cv_best']:.4f} | {found['cv_last']:.4f} | "
              f"{found['optimism']:.4f} ± {found['optimism_std']:.4f} |")


if __name__ == "__main__":
    main()
