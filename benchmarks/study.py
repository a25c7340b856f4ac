"""The study behind the defaults: each lever as one 5-fold CV of one backbone, with its CPU time.

    python benchmarks/study.py [--only NAME ...] [--list] [--report] [--merge FILE ...] [--work DIR] [--threads N]

Every entry of ``LEVERS`` is a list of dotted overrides on top of ``params.yaml`` (tuning off, so the
figure is the setting's own); each runs prepare, folds and train in its own work directory under
``work/study/`` (prepare and folds take seconds and are shared by every entry with the same image
settings). It records the CV macro-F1 (mean ± std of folds), the OOF accuracy, the lowest class
F1, each fold's score and the CPU time (user + system; a busy machine inflates it far less than wall time) and wall
time of train in ``benchmarks/study.json`` (entries already there are kept, so an
interrupted study goes on where it stopped; ``--only`` re-runs some), then prints the table
(printed, for docs/study.md) and the plot ``docs/study.png`` (CV against CPU time). Every entry run on the same
folds as today's default (``DEFAULT``) is also paired with it fold by fold: a fold's difficulty, most of either CV's
spread, cancels in the difference. Only the training folds' OOF predictions are scored; the hidden test is never read.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import layout  # noqa: E402
from pipeline.artifacts import save_figure, write_json  # noqa: E402
from pipeline.config import load_config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "study.json"
DEFAULT = "epochs30_lr12"  # the entry that is today's default: levers on its schedule are paired with it by fold
PLOT = ROOT / "docs" / "study.png"
# keep_epoch=best: every entry was measured with each fold's best epoch kept, as the default did until 388c16e; the
# pick's optimism (about 0.015) is alike for every lever, so the entries stay comparable with each other.
BASE = ["train.use_tuned=false", "backbones=[lcnet_050]", "train.lr=0.006", "train.epochs=15", "train.keep_epoch=best"]

# name -> (what it changes, overrides). The first is the reference the others change one thing of.
LEVERS: dict[str, tuple[str, list[str]]] = {
    "reference": ("lcnet_050, 96 px, 15 epochs, lr 6e-3, flips", []),
    "epochs30": ("30 epochs", ["train.epochs=30"]),
    "lcnet_100": ("lcnet_100 (twice the width)", ["backbones=[lcnet_100]"]),
    "size128": ("128 px", ["data.image_size=128"]),
    "aux_type": ("cell type as an auxiliary head", ["data.aux_cols=[type]"]),
    "light_aug": ("flips + small shifts, brightness/contrast", ["train.augment=light"]),
    "mnv3_small_100": ("mobilenetv3_small_100", ["backbones=[mobilenetv3_small_100]", "train.lr=0.003"]),
    "focal": ("focal loss", ["train.loss=focal"]),
    "ema": ("EMA of the weights", ["train.ema=true"]),
    "ema99": ("EMA of the weights, decay 0.99", ["train.ema=true", "train.ema_decay=0.99"]),
    "resnet10t": ("resnet10t", ["backbones=[resnet10t]", "train.lr=0.003"]),
    "size160": ("160 px", ["data.image_size=160"]),
    "onecycle": ("one-cycle schedule", ["train.scheduler=onecycle"]),
    "mixup": ("mixup 0.2", ["train.mixup=0.2"]),
    "lr12": ("lr 1.2e-2", ["train.lr=0.012"]),
    "ghostnet_050": ("ghostnet_050", ["backbones=[ghostnet_050]"]),
    "pseudo": ("pseudo-labels, a second round (threshold 0.9)", ["train.pseudo_label=true"]),
    "epochs30_lr12": ("30 epochs and lr 1.2e-2 together", ["train.epochs=30", "train.lr=0.012"]),
    "pseudo060": ("pseudo-labels, a second round (threshold 0.6)",
                  ["train.pseudo_label=true", "train.pseudo_threshold=0.6"]),
    "bs16_lr12": ("batch 16 and lr 1.2e-2 (twice the steps of 15 epochs)", ["train.batch_size=16", "train.lr=0.012"]),
    "mnv3_050_e30_lr12": ("mobilenetv3_small_050, 30 epochs, lr 1.2e-2",
                          ["backbones=[mobilenetv3_small_050]", "train.epochs=30", "train.lr=0.012"]),
    "epochs60_lr12": ("60 epochs and lr 1.2e-2 (twice the default's epochs)", ["train.epochs=60", "train.lr=0.012"]),
    "size128_e30_lr12": ("128 px, 30 epochs, lr 1.2e-2 (the default's schedule at a finer size)",
                         ["data.image_size=128", "train.epochs=30", "train.lr=0.012"]),
    "ema99_e30_lr12": ("EMA of the weights at decay 0.99 on the default's schedule (30 epochs, lr 1.2e-2)",
                       ["train.epochs=30", "train.lr=0.012", "train.ema=true", "train.ema_decay=0.99"]),
    "mnv3_075_e30_lr12": ("mobilenetv3_small_075 (1.5 times the width, 0.92 times the speed), 30 epochs, lr 1.2e-2",
                          ["backbones=[mobilenetv3_small_075]", "train.epochs=30", "train.lr=0.012"]),
    "lr24_e30": ("30 epochs and lr 2.4e-2 (twice the default's rate)", ["train.epochs=30", "train.lr=0.024"]),
    "mnv4_050_e30_lr12": ("mobilenetv4_conv_small_050 (another family), 30 epochs, lr 1.2e-2",
                          ["backbones=[mobilenetv4_conv_small_050]", "train.epochs=30", "train.lr=0.012"]),
    "lessreg_e30_lr12": ("the default's schedule with less regularisation (weight decay 0.01, no label smoothing, no "
                         "dropout)", ["train.epochs=30", "train.lr=0.012", "train.weight_decay=0.01",
                                      "train.label_smoothing=0.0", "train.drop_rate=0.0"]),
    "noaug_e30_lr12": ("the default's schedule without augmentation (`train.augment=none`)",
                       ["train.epochs=30", "train.lr=0.012", "train.augment=none"]),
    "seed1_e30_lr12": ("the default's settings with another training seed (`train.seed=1`): the run-to-run noise",
                       ["train.epochs=30", "train.lr=0.012", "train.seed=1"]),
    "seed2_e30_lr12": ("the default's settings with a third training seed (`train.seed=2`)",
                       ["train.epochs=30", "train.lr=0.012", "train.seed=2"]),
    "sgd_e30": ("the default's schedule with SGD (Nesterov momentum 0.9, lr 0.1, weight decay 5e-4)",
                ["train.epochs=30", "train.optimizer=sgd", "train.lr=0.1", "train.weight_decay=0.0005"]),
    "ordinal_e30_lr12": ("the default's schedule with the ordinal loss (`train.loss=ordinal`: soft targets shared "
                         "with the neighbouring defect levels)", ["train.epochs=30", "train.lr=0.012",
                                                                  "train.loss=ordinal"]),
}


def children_cpu_seconds() -> float:
    """CPU seconds (user + system) of the finished child processes: a lever's cost that a busy machine does not
    inflate the way it inflates wall time."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_lever(name: str, overrides: list[str], work: Path, threads: int) -> dict:
    """prepare + folds + train of one entry in its own work dir; its CV figures and train's wall time."""
    settings = [*BASE, *overrides, *layout.overrides_under(work / name)]
    # Read before the stages run: a params.yaml edited mid-study (a new key this process does not know) then stops
    # the study before a lever's training, not after it.
    cfg = load_config(ROOT / "params.yaml", settings)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    seconds, cpu_seconds = {}, {}
    for stage in ("prepare", "folds", "train"):
        started, cpu_started = time.perf_counter(), children_cpu_seconds()
        result = subprocess.run([sys.executable, "-m", f"pipeline.{stage}", *settings], cwd=ROOT, env=env,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{name}: {stage} failed:\n{result.stderr[-3000:]}")
        seconds[stage], cpu_seconds[stage] = time.perf_counter() - started, children_cpu_seconds() - cpu_started
    metrics = json.loads(layout.train_metrics_file(cfg, next(iter(cfg.backbones))).read_text())
    metrics = {key.removeprefix(f"{next(iter(cfg.backbones))}_"): value for key, value in metrics.items()}
    per_class = [value for key, value in metrics.items() if key.startswith("oof_f1_")]
    return {"changes": LEVERS[name][0], "overrides": overrides, "cv": round(metrics["cv"], 4),
            "cv_std": round(metrics["cv_std"], 4), "accuracy": round(metrics["oof_accuracy"], 4),
            "lowest_class_f1": round(min(per_class), 4), "fold_scores": fold_scores(metrics),
            "best_epochs": [int(value) for value in per_fold(metrics, "best_epoch")],
            "train_s": round(seconds["train"]), "train_cpu_s": round(cpu_seconds["train"]), "threads": threads,
            **({"round1_cv": round(metrics["round1_cv"], 4)} if "round1_cv" in metrics else {})}


def per_fold(metrics: dict, name: str) -> list[float]:
    """Each fold's ``name`` (``macro_f1``, ``best_epoch``), fold 0 first, from train's metrics (keys
    ``fold<k>_<name>``, as ``pipeline.metrics.train_record`` writes them, backbone prefix off)."""
    named = [key for key in metrics if key.startswith("fold") and key.endswith(f"_{name}")]
    folds = sorted(int(key[4:].split("_")[0]) for key in named)
    return [metrics[f"fold{fold}_{name}"] for fold in folds]


def fold_scores(metrics: dict) -> list[float]:
    """Each fold's macro-F1, fold 0 first, to four decimals."""
    return [round(value, 4) for value in per_fold(metrics, "macro_f1")]


def paired(scores: list[float], base_scores: list[float]) -> dict:
    """A lever against the base on the same folds: the mean and std (n-1) of the per-fold differences and how many
    folds it beat the base on. Both see the same images in each fold, so a fold's difficulty, most of the spread
    of either CV, cancels: a gain every fold shows is real even when it is smaller than either CV's fold-std."""
    if len(scores) != len(base_scores):
        raise ValueError(f"{len(scores)} fold scores against the base's {len(base_scores)}: not the same folds")
    differences = np.asarray(scores) - np.asarray(base_scores)
    return {"mean": float(differences.mean()), "std": float(differences.std(ddof=1)),
            "better": int((differences > 0).sum()), "folds": len(differences)}


def paired_cell(result: dict, base: dict | None) -> str:
    """The table's paired column: ``+0.0126 ± 0.0098 (5/5 folds)``, or a dash without fold scores on both sides."""
    if base is None or result is base or "fold_scores" not in result or "fold_scores" not in base:
        return "-"
    found = paired(result["fold_scores"], base["fold_scores"])
    return f"{found['mean']:+.4f} ± {found['std']:.4f} ({found['better']}/{found['folds']} folds)"


def table(results: dict) -> str:
    lines = ["| lever | CV macro-F1 (mean ± std of folds) | paired with the default, by fold: mean ± std of the "
             "differences (folds better) | OOF accuracy | lowest class F1 | train CPU time |",
             "|---|---|---|---|---|---|"]
    base = results.get(DEFAULT)
    for r in results.values():
        lines.append(f"| {r['changes']} | {r['cv']:.4f} ± {r['cv_std']:.4f} | {paired_cell(r, base)} | "
                     f"{r['accuracy']:.4f} | {r['lowest_class_f1']} | {r['train_cpu_s']} s |")
    return "\n".join(lines) + "\n"


def merged(results: dict, side_results: list[dict]) -> dict:
    """``results`` with every entry of the side studies' results added; a side entry replaces one of the same name
    (it is the newer run: ``--only`` re-runs an entry). Entries no longer in ``LEVERS`` are refused by name."""
    merged_results = dict(results)
    for side in side_results:
        unknown = sorted(set(side) - set(LEVERS))
        if unknown:
            raise SystemExit(f"study: --merge: entries not in LEVERS: {', '.join(unknown)}")
        merged_results.update(side)
    return merged_results


def plot(results: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        axes.errorbar(r["train_cpu_s"], r["cv"], yerr=r["cv_std"], fmt="o", capsize=3)
        axes.annotate(name, (r["train_cpu_s"], r["cv"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel("train CPU time, 5 folds (s)")
    axes.set_ylabel("CV macro-F1 (mean ± std of folds)")
    axes.grid(alpha=0.3)
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="run these entries (again); default: those not yet measured")
    parser.add_argument("--list", action="store_true", help="list the entries and exit")
    parser.add_argument("--report", action="store_true", help="only write the table and plot of what is measured")
    parser.add_argument("--work", type=Path, default=ROOT / "work" / "study")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run (default 1)")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="the results file (another one lets two studies run side by side, one core each; merge "
                             "it into benchmarks/study.json with --merge)")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="FILE",
                        help="add the entries of side studies' results files to the results file, then report")
    args = parser.parse_args()
    if args.list:
        for name, (changes, overrides) in LEVERS.items():
            print(f"{name:16} {changes}: {' '.join(overrides)}")
        return
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    if args.merge:
        results = merged(results, [json.loads(path.read_text()) for path in args.merge])
        write_json(args.results, results)
    names = [] if args.report or args.merge else args.only or [name for name in LEVERS if name not in results]
    for name in names:
        print(f"study: {name} ({LEVERS[name][0]}) ...", file=sys.stderr, flush=True)
        results[name] = run_lever(name, LEVERS[name][1], args.work, args.threads)
        print(f"study: {name}: {results[name]}", file=sys.stderr, flush=True)
        write_json(args.results, results)
    ordered = {name: results[name] for name in LEVERS if name in results}
    print(table(ordered))  # the table of docs/study.md
    if args.results == RESULTS:  # a side study's partial results do not replace the plot of the whole
        save_figure(PLOT, plot(ordered))


if __name__ == "__main__":
    main()
