"""How should the embed member use an image's flipped views, and how should it scale its features? CV of its variants.

    python benchmarks/embed_views.py WORK [WORK ...] [--encodings DIR] [--out benchmarks/embed_views.json]

WORK is a run's work directory after prepare and folds, or a finished run (``benchmarks/splits.py``'s ``seed<N>``,
one per ELPV split seed): its ``folds.csv`` and, in the first, the image cache at the embed member's 224 px. Every
one of the 2,624 ELPV images (the splits differ only in which rows are which) is read once in each of four views (as
it is, mirrored, upside down, both) by the packaged ImageNet EfficientNet-Lite0 with ``embed.stages: 2`` (its final
map and its last two feature stages, mean- and max-pooled: the embed stage's own ``embedding.pooled_maps``), and the
pooled features of each view are kept in ``--encodings`` (read again on the next call).

Per variant (which views, averaged into one row or each its own training row, the features' scaling, the
regression's C and class balance) and run: the member's CV, the mean over folds of macro-F1 of the cross-fit logistic
regression on that run's folds, and its OOF accuracy; where the run holds the other members' OOF (a finished run),
also the CV and OOF accuracy of the soft vote with it in place of the embed member (the fine-tuned member's OOF
with its test-time views, as the ensemble reads it). Only training rows and their folds
are read: no test label.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.embed_stages import all_images, fold_mean, read_folds  # noqa: E402
from pipeline import metrics  # noqa: E402
from pipeline.training import embedding, linear  # noqa: E402

VIEWS = {"identity": lambda images: images, "mirror": lambda images: images[:, :, ::-1],  # N x H x W x C
         "upside_down": lambda images: images[:, ::-1], "both": lambda images: images[:, ::-1, ::-1]}
TWO, FOUR = ["identity", "mirror"], list(VIEWS)
# the other members' OOF as the ensemble reads them: the fine-tuned Lite0's TTA'd OOF (infer's), the features member's
OTHER_MEMBERS = ("preds/tf_efficientnet_lite0_oof.parquet", "features/oof.parquet")
# (label, views, as rows: each view its own training row and the views' probabilities averaged, else the views'
#  features averaged into one row, scaling, C, balance power); the first is the embed default
VARIANTS = [
    ("two views averaged, C 0.01 (the default before)", TWO, False, "none", 0.01, 0.5),
    ("two views averaged, C 0.003", TWO, False, "none", 0.003, 0.5),
    ("two views averaged, signed square root", TWO, False, "sqrt", 0.01, 0.5),
    ("two views averaged, balance power 1", TWO, False, "none", 0.01, 1.0),
    ("two views as rows", TWO, True, "none", 0.01, 0.5),
    ("two views as rows, C 0.003", TWO, True, "none", 0.003, 0.5),
    ("four views averaged", FOUR, False, "none", 0.01, 0.5),
    ("four views as rows", FOUR, True, "none", 0.01, 0.5),
    ("four views as rows, C 0.003", FOUR, True, "none", 0.003, 0.5),
    ("four views averaged, C 0.003", FOUR, False, "none", 0.003, 0.5),
    ("four views averaged, C 0.03", FOUR, False, "none", 0.03, 0.5),
    ("four views averaged, C 0.001", FOUR, False, "none", 0.001, 0.5),
    ("four views averaged, C 0.1", FOUR, False, "none", 0.1, 0.5),
    ("two views averaged, C 0.03", TWO, False, "none", 0.03, 0.5),
]


def encode(work: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """(ids, {view: N x D pooled features}): Lite0 frozen, ``embed.stages`` 2, every image in every view, each view
    read by the embed stage's own ``embedding.embed_images``."""
    ids, images = all_images(work, 224)
    model, mean, std = embedding.frozen_backbone("efficientnet_lite0", 1)
    return ids, {view: embedding.embed_images(model, flipped(images), mean, std, [], 64, f"embed_views {view}",
                                              stages=2) for view, flipped in VIEWS.items()}


def encodings(work: Path, folder: Path) -> dict[str, pd.DataFrame]:
    path = folder / "lite0_224_views.npz"
    if not path.exists():
        started = time.perf_counter()
        ids, views = encode(work)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(path, ids=np.array(ids, dtype=str), **views)
        print(f"embed_views: four views encoded in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    with np.load(path) as saved:
        return {view: pd.DataFrame(saved[view], index=saved["ids"]) for view in VIEWS}


def scaled(x: np.ndarray, scaling: str) -> np.ndarray:
    return np.sign(x) * np.sqrt(np.abs(x)) if scaling == "sqrt" else x


def cross_fit(views: list[np.ndarray], labels: np.ndarray, folds: np.ndarray, as_rows: bool, n_classes: int,
              inverse_regularisation: float, balance_power: float) -> np.ndarray:
    """OOF probabilities: per fold, a regression on the other folds' rows (the views' mean, or every view a row of
    its own), its held-out predictions averaged over the views it was fitted on."""
    if not as_rows:
        x = np.mean(views, axis=0)
        return linear.cross_fit_logistic(x, labels, folds, x[:1], n_classes, inverse_regularisation,
                                         balance_power)[0]
    oof = np.zeros((len(labels), n_classes))
    for fold in np.unique(folds):
        train, held = folds != fold, folds == fold
        x_train = np.concatenate([view[train] for view in views])
        y_train = np.tile(labels[train], len(views))
        predictions = linear.fit_predict(x_train, y_train, [view[held] for view in views], n_classes,
                                         inverse_regularisation, balance_power)
        oof[held] = np.mean(predictions, axis=0)
    return oof


def score_run(work: Path, encoded: dict[str, pd.DataFrame], variant: tuple) -> dict:
    """The variant's member CV and OOF accuracy; with the run's other members' OOF, the soft vote's."""
    _, names, as_rows, scaling, inverse_regularisation, balance_power = variant
    ids, folds, labels, classes = read_folds(work)
    views = [scaled(encoded[name].loc[ids].to_numpy(), scaling) for name in names]
    oof = cross_fit(views, labels, folds, as_rows, len(classes), inverse_regularisation, balance_power)
    row = {"member_cv": fold_mean("macro_f1", labels, oof, folds),
           "member_oof_accuracy": metrics.score("accuracy", labels, oof)}
    if all((work / name).exists() for name in OTHER_MEMBERS):
        others = [pd.read_parquet(work / name).astype({"id": str}).set_index("id").loc[ids, classes].to_numpy()
                  for name in OTHER_MEMBERS]
        vote = (oof + sum(others)) / (1 + len(others))
        row.update(vote_cv=fold_mean("macro_f1", labels, vote, folds),
                   vote_oof_accuracy=metrics.score("accuracy", labels, vote))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("works", nargs="+", type=Path, help="runs' work directories (prepare and folds done)")
    parser.add_argument("--encodings", type=Path, default=ROOT / "work" / "embed_views")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "embed_views.json")
    parser.add_argument("--variants", nargs="+", metavar="LABEL",
                        help="run only the variants whose label is one of these; --out keeps its other variants")
    args = parser.parse_args()
    encoded = encodings(args.works[0], args.encodings)
    chosen = [variant for variant in VARIANTS if not args.variants or variant[0] in args.variants]
    earlier = json.loads(args.out.read_text()) if args.variants and args.out.exists() else {"variants": []}
    kept = [{"command": earlier.get("command"), **row} for row in earlier["variants"]]  # each row its command
    rows = []
    for variant in chosen:
        started = time.perf_counter()
        runs = {work.name: score_run(work, encoded, variant) for work in args.works}
        keys = [key for key in ("member_cv", "member_oof_accuracy", "vote_cv", "vote_oof_accuracy")
                if any(key in run for run in runs.values())]  # the vote's: over the finished runs only
        summary = {key: float(np.mean([run[key] for run in runs.values() if key in run])) for key in keys}
        spread = float(np.std([run["member_cv"] for run in runs.values()], ddof=1)) if len(runs) > 1 else 0.0
        rows.append({"variant": variant[0], **summary, "member_cv_std_over_runs": spread, "runs": runs})
        print(f"| {variant[0]} | {summary['member_cv']:.4f} ± {spread:.4f} | {summary['member_oof_accuracy']:.4f} | "
              + " ".join(f"{run['member_cv']:.4f}" for run in runs.values())
              + (f" | vote {summary['vote_cv']:.4f} over {sum('vote_cv' in run for run in runs.values())} runs: "
                 + " ".join(f"{run['vote_cv']:.4f}" for run in runs.values() if "vote_cv" in run)
                 if "vote_cv" in summary else "")
              + f" | {time.perf_counter() - started:.0f} s |", flush=True)
    command = " ".join(["python", *sys.argv])
    for row in rows:
        row["command"] = command
    ran = {row["variant"] for row in rows}
    rows = sorted([*[row for row in kept if row["variant"] not in ran], *rows],
                  key=lambda row: [variant[0] for variant in VARIANTS].index(row["variant"]))
    args.out.write_text(json.dumps({"variants": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
