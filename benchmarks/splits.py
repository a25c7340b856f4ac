"""Does the recipe hold on other splits, and does its CV predict the hidden test? The default chain on N splits.

    python benchmarks/splits.py [--seeds 0 1 2] [--folder-copy] [--config FILE] [--work DIR] [--score-only]
                                [--stages STAGE ...] [k=v ...]

For every ``data.elpv_seed`` the whole chain (prepare, folds, tune, train, infer, ensemble, submit:
the commands dvc.yaml runs, with the given settings unchanged) runs in its own work directory
under ``work/splits/``. ``--folder-copy`` adds one more run: the first seed's competition copied
as a folder competition with other column names and string labels (read through
``data.source=folder``), which checks that nothing depends on the embedded layout.

Per run it prints the ensemble's CV (the cross-fitted OOF score that the leaderboard's ``cv``
column holds), the Public and Private scores, the CV-test gap (CV minus the whole hidden test's
score), and the whole hidden test's accuracy and macro-F1 (both halves of solution.csv together), of the
submission and of each member alone (is the ensemble better than its best member on the test too?);
then the mean and standard deviation over runs. The hidden labels are read here only to report
these figures, never to choose anything. Results go to ``benchmarks/splits.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import layout, metrics  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.ensemble import member_files  # noqa: E402

STAGES = ["prepare", "folds", "tune", "train", "infer", "features", "embed", "ensemble", "submit"]
# The folder copy renames everything a layout could silently depend on.
FOLDER_LABELS = {"p000": "intact", "p033": "possibly defective", "p067": "likely defective", "p100": "defective"}
FOLDER_COLUMNS = {"id": "cell_id", "defect": "defect_grade"}


def run_chain(config: str, overrides: list[str], log: Path, stages: list[str] = STAGES) -> float:
    """Every stage of the chain in order, as dvc.yaml runs them (or only ``stages``, on a finished run: what a change
    to one member does to the figures); returns the wall seconds."""
    started = time.perf_counter()
    with open(log, "a" if stages != STAGES else "w") as handle:
        for stage in stages:
            command = [sys.executable, "-m", f"pipeline.{stage}", "--config", config, *overrides]
            handle.write(f"$ {' '.join(command)}\n")
            handle.flush()
            result = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
            if result.returncode != 0:
                raise SystemExit(f"splits: {stage} failed (exit {result.returncode}); see {log}")
    return time.perf_counter() - started


def whole_test_scores(cfg: Config) -> dict:
    """Accuracy and the metric on every row of solution.csv (Public and Private) of the submitted labels, and of
    each member's own test predictions (its folds' TTA average, argmax): does the ensemble beat its best member?"""
    cache = layout.cache_dir(cfg)
    meta = json.loads((cache / layout.CACHE_META).read_text())
    id_col, target_col = meta["id_col"], meta["target_col"]
    solution = pd.read_csv(cache / layout.CACHE_SOLUTION, dtype=str).set_index(id_col)
    submission = pd.read_csv(layout.latest_submission_file(cfg), dtype=str).set_index(id_col)
    lookup = {name: index for index, name in enumerate(meta["class_names"])}
    y_true = solution[target_col].map(lookup).to_numpy()
    predicted = submission.loc[solution.index, target_col].map(lookup).to_numpy()
    scores = labels_scores(cfg.metric, y_true, predicted, len(lookup), "test")
    members = member_files(cfg)  # the backbones and, when enabled, the features member
    for name, (_, _, test_file) in members.items():
        member = pd.read_parquet(test_file).astype({"id": str}).set_index("id")
        member_labels = member.loc[solution.index, list(meta["class_names"])].to_numpy().argmax(1)
        scores.update(labels_scores(cfg.metric, y_true, member_labels, len(lookup), f"{name}_test"))
    for metric in {"macro_f1", cfg.metric}:
        scores[f"best_member_test_{metric}"] = max(scores[f"{name}_test_{metric}"] for name in members)
    return scores


def labels_scores(metric: str, y_true: np.ndarray, predicted: np.ndarray, n_classes: int, prefix: str) -> dict:
    """Accuracy, macro-F1 and the competition's metric of hard labels, keyed ``<prefix>_<name>``."""
    one_hot = np.eye(n_classes)[predicted]
    return {f"{prefix}_accuracy": metrics.accuracy(y_true, one_hot),
            f"{prefix}_macro_f1": metrics.macro_f1(y_true, one_hot),
            f"{prefix}_{metric}": metrics.score(metric, y_true, one_hot)}


def folder_copy(source: Path, target: Path) -> Path:
    """The ELPV competition at ``source`` as a folder competition with other column names and string labels."""
    shutil.rmtree(target, ignore_errors=True)
    for split in ("train", "test"):
        shutil.copytree(source / split, target / split)
    for name in ("train.csv", "sample_submission.csv", "solution.csv"):
        table = pd.read_csv(source / name, dtype=str).rename(columns=FOLDER_COLUMNS)
        table[FOLDER_COLUMNS["defect"]] = table[FOLDER_COLUMNS["defect"]].map(FOLDER_LABELS)
        table.to_csv(target / name, index=False)
    return target


def one_run(name: str, config: str, overrides: list[str], out: Path, score_only: bool = False,
            stages: list[str] = STAGES) -> dict:
    cfg = load_config(config, overrides)
    log = out / f"{name}.log"
    seconds = float("nan") if score_only else run_chain(config, overrides, log, stages)
    scores = json.loads(layout.submission_metrics_file(cfg).read_text())
    test = whole_test_scores(cfg)
    method = json.loads((layout.ensemble_dir(cfg) / layout.ENSEMBLE_WEIGHTS).read_text())["method"]
    row = {"run": name, "cv": scores["cv"], "public": scores["public"], "private": scores["private"],
           **test, "gap": scores["cv"] - test[f"test_{cfg.metric}"], "method": method,
           "minutes": round(seconds / 60, 2), "log": str(log)}
    print(f"splits: {name}: CV {row['cv']:.4f} | Public {row['public']:.4f} | Private {row['private']:.4f} | "
          f"whole test acc {row['test_accuracy']:.4f} macro-F1 {row['test_macro_f1']:.4f} (best member "
          f"{row['best_member_test_macro_f1']:.4f}) | gap {row['gap']:+.4f} | {row['minutes']} min", file=sys.stderr)
    return row


def table(rows: list[dict]) -> str:
    columns = ["cv", "public", "private", "gap", "test_accuracy", "test_macro_f1", "best_member_test_macro_f1",
               "minutes"]
    lines = ["| run | " + " | ".join(columns) + " | method |", "|---|" + "---|" * (len(columns) + 1)]
    lines += [f"| {r['run']} | " + " | ".join(f"{r[c]:.4f}" for c in columns) + f" | {r['method']} |" for r in rows]
    frame = pd.DataFrame(rows)[columns]
    lines.append("| mean ± std | " + " | ".join(f"{frame[c].mean():.4f} ± {frame[c].std(ddof=1):.4f}"
                                                 for c in columns) + " | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="data.elpv_seed values")
    parser.add_argument("--folder-copy", action="store_true", help="also run a folder copy of the first seed")
    parser.add_argument("--config", default="params.yaml")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "splits.json"))
    parser.add_argument("--work", default=str(ROOT / "work" / "splits"), help="where each run's work dir goes")
    parser.add_argument("--score-only", action="store_true",
                        help="run nothing: score the finished runs already in --work (e.g. a `dvc repro` of each "
                             "seed's clone, its work folder, metrics and submissions moved to <work>/seed<N>/)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=STAGES,
                        help="run only these stages, in the chain's order, on the finished runs in --work (after a "
                             "change to one member: e.g. --stages embed ensemble submit)")
    parser.add_argument("overrides", nargs="*", help="settings for every run (default: none, the defaults)")
    args = parser.parse_args()
    logs = Path(args.work).resolve()
    logs.mkdir(parents=True, exist_ok=True)
    stages = [stage for stage in STAGES if stage in args.stages]
    rows = []
    for seed in args.seeds:
        overrides = [*args.overrides, f"data.elpv_seed={seed}", *layout.overrides_under(logs / f"seed{seed}")]
        rows.append(one_run(f"seed{seed}", args.config, overrides, logs, args.score_only, stages))
    if args.folder_copy:
        first = load_config(args.config, [*args.overrides, *layout.overrides_under(logs / f"seed{args.seeds[0]}")])
        folder = logs / "folder_competition"
        if stages == STAGES and not args.score_only:  # a finished run keeps the competition it was run on
            folder_copy(layout.competition_dir(first), folder)
        overrides = [*args.overrides, "data.source=folder", f"data.dir={folder}",
                     *layout.overrides_under(logs / "folder")]
        rows.append(one_run(f"folder (seed {args.seeds[0]})", args.config, overrides, logs, args.score_only, stages))
    command = " ".join(["python", *sys.argv])  # the page of results (benchmarks/results.py) prints it
    Path(args.out).write_text(json.dumps({"command": command, "overrides": args.overrides, "runs": rows}, indent=2)
                              + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
