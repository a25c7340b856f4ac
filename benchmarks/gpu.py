"""GPU figures of the GPU preset (configs/gpu.yaml), measured on one CUDA device within 10 minutes.

    python benchmarks/gpu.py [--epochs N] [--only NAME ...] [--out FILE]
    python benchmarks/gpu.py --device cpu --quick --out /tmp/gpu.json   # smoke mode, every figure tiny

Prints a table of every figure (with its target where one exists) and writes ``benchmarks/gpu.json``
(``--out``) with the device's name, the torch version and the date. Every model starts from random
weights (``train.pretrained=false``): the benchmark machine has no network. Measurements (``--only``):

- throughput: training images/s of each backbone of the preset (one step: forward, loss, backward,
  optimizer step; the preset's batch size, image size, AMP and channels_last, eager), on batches
  already augmented and on the device: the model's own speed. Median of several passes, warm-up excluded.
- loader: ``loader_efficiency`` of benchmarks/run.py on the preset (real loader with worker processes /
  in-memory batches; that function trains without AMP or compile). Target >= 0.90 on a GPU.
- speedups: for the preset's first backbone, images/s with AMP bf16 and fp16 over AMP off, channels_last
  on over off, and torch.compile on over off (each median of paired, interleaved passes in this run;
  warm-up passes, where compile compiles, are not timed).
- tta: ``tta_cost`` of benchmarks/run.py with the preset's TTA views (seconds of k views / k plain passes).
  Target <= 1.1.
- elpv: the whole chain (prepare, folds, train, infer, ensemble, submit; no tuning) of the ELPV
  competition from scratch at full resolution (300 px), ``--epochs`` epochs (default 10), in a
  scratch folder: wall time, CV (each backbone's and the ensemble's OOF) and the local leaderboard's
  Public / Private. ``runtime.compile`` is off there: compiling every fold's model would take most of
  the budget (its speed-up is the speedups figure).

Without CUDA it exits 2 unless ``--device cpu --quick``: the smoke mode tests/test_gpu_benchmark.py runs, every
measurement tiny (image size 32, one step per pass, 1 epoch on 240 images, 2 folds, and one backbone, timm's
tiny ``test_convnext``; compile only captures the graph there, without code generation). Its numbers check the
code paths, not the speed.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
MEASUREMENTS = ("throughput", "loader", "speedups", "tta", "elpv")
NO_CUDA = ("no CUDA device: the GPU benchmark measures nothing on the CPU "
           "(run it where torch.cuda.is_available())")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: every measurement tiny (tests)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (with --quick only)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON to write (default benchmarks/gpu.json; with --quick a temporary file)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the ELPV run (default 10, quick 1)")
    parser.add_argument("--only", nargs="+", choices=MEASUREMENTS, default=list(MEASUREMENTS), metavar="NAME",
                        help=f"run only these measurements: {', '.join(MEASUREMENTS)}")
    return parser.parse_args(argv)


def check_device(args: argparse.Namespace) -> None:
    """Exit 2 with a message (no traceback) where nothing can be measured."""
    if args.device == "cpu" and not args.quick:
        print("--device cpu runs only the smoke mode: add --quick", file=sys.stderr)
        raise SystemExit(2)
    if args.device != "cpu" and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":  # before the imports below (timm, the stages: seconds): refuse at once
    check_device(parse_args())

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCHMARKS))

import run as cpu_benchmarks  # noqa: E402  (benchmarks/run.py: median_time, loader_efficiency, tta_cost)
from pipeline import embed, ensemble, features, folds, infer, layout, prepare, submit, train  # noqa: E402
from pipeline.training import fold_setup, kfold  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.training.loop import StepState, autocast_dtype, torch_device, train_one_epoch  # noqa: E402
from pipeline.training.models import create_model  # noqa: E402

PRESET = ROOT / "configs" / "gpu.yaml"
# The smoke mode: a few hundred tiny images, 2 folds, in-process loaders, and one backbone: timm's tiny test
# model of the first backbone's family (200k parameters; convnext_tiny's 28M take minutes per measurement on 2
# cores), under a dotted name like the preset's, so the key -> `model` path is the one the full run takes.
QUICK = ["data.image_size=32", "data.elpv_size=240", "folds.n_splits=2", "train.batch_size=16", "data.workers=0",
         "runtime.eval_batch_size=64", "backbones=[test_convnext.r160_in1k]"]
BUDGET_S = 600
TARGETS = {"loader_efficiency": (">= 0.90 GPU", lambda v: v >= 0.90),
           "tta_cost_per_view": ("<= 1.1", lambda v: v <= 1.1),
           "total_s": (f"<= {BUDGET_S} s", lambda v: v <= BUDGET_S)}


class Plan:
    """How much each measurement does: a full run on the GPU, or the smoke mode."""

    def __init__(self, quick: bool, device: str, epochs: int | None):
        self.quick, self.device = quick, device
        self.steps = 1 if quick else 20  # training steps per timed pass
        self.repeats = 3 if quick else 5  # timed passes per figure (median)
        self.loader_steps, self.loader_repeats = (2, 3) if quick else (20, 7)  # run.py's own full run: 30, 11
        self.tta_images = 16 if quick else 512  # images each view predicts
        self.epochs = epochs or (1 if quick else 10)


def preset_config(work: Path, plan: Plan, *extra: str) -> Config:
    """The GPU preset with every output under ``work``, no pretrained weights, no tuning (smoke: tiny)."""
    overrides = [*layout.overrides_under(work), "train.pretrained=false", "tune.enabled=false", "train.loggers=[]",
                 f"runtime.device={plan.device}"]
    if plan.quick:
        overrides += QUICK
    return load_config(PRESET, [*overrides, *extra])


def release(device: torch.device) -> None:
    """Free what the last measurement left on the device before the next one."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- training steps on in-memory batches

def device_batches(cfg: Config, data, steps: int, device: torch.device) -> list:
    """``steps`` full batches through the real loader and augmentation, kept on the device."""
    indices = np.arange(min(len(data.ids), steps * cfg.train.batch_size))
    loader = fold_setup.make_train_loader(cfg, data, indices, device, seed=0)
    augment = fold_setup.make_batch_augment(cfg, seed=0) or (lambda images: images)
    return [(augment(images.to(device)), targets.to(device)) for images, targets in loader]


def compile_backend(device: torch.device) -> str:
    """inductor on a GPU; on the CPU (the smoke mode) dynamo's capture alone, without code generation: the path
    in seconds (inductor's C++ build takes minutes on 2 cores), not a speed."""
    return "inductor" if device.type == "cuda" else "eager"


def training_pass(cfg: Config, backbone: str, data, device: torch.device, amp: str, channels_last: bool,
                  compiled: bool):
    """A function that trains one pass over a list of batches with these settings (its own model and optimizer)."""
    torch.manual_seed(0)
    model = create_model(fold_setup.timm_name(cfg, backbone), data.heads, cfg.data.channels, data.mean, data.std,
                         drop_path_rate=cfg.train.drop_path_rate).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    compute_loss, losses = fold_setup.make_loss(cfg.train, data.heads, data.targets)
    for loss in losses:
        loss.to(device)
    optimizer = fold_setup.make_optimizer(cfg.train, model)
    dtype = autocast_dtype(amp, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    forward = torch.compile(model, backend=compile_backend(device)) if compiled else model

    def one_pass(batches) -> None:
        train_one_epoch(forward, batches, optimizer, compute_loss, device, state=StepState(), amp=dtype,
                        scaler=scaler, channels_last=channels_last, desc="bench gpu")
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return one_pass


def interleaved_times(passes: dict, batches: list, repeats: int) -> dict:
    """Seconds of each pass, ``repeats`` times round-robin (a slow spell hits every setting); one untimed
    warm-up pass each first (allocator, kernels, compile's compilation)."""
    for one_pass in passes.values():
        one_pass(batches)
    times = {name: [] for name in passes}
    for _ in range(repeats):
        for name, one_pass in passes.items():
            times[name].append(cpu_benchmarks.median_time(lambda one_pass=one_pass: one_pass(batches), 1))
    return times


# ---------------------------------------------------------------- 1. throughput, 3. speed-ups

def throughput(cfg: Config, plan: Plan) -> dict:
    """Training images/s of every backbone of the preset at its settings (eager)."""
    device = torch_device(cfg.runtime.device)
    results = {}
    for backbone in cfg.backbones:
        backbone_cfg = cfg.for_backbone(backbone)
        data = kfold.load_training_data(backbone_cfg)
        batches = device_batches(backbone_cfg, data, plan.steps, device)
        one_pass = training_pass(backbone_cfg, backbone, data, device, cfg.runtime.amp, cfg.runtime.channels_last,
                                 compiled=False)
        seconds = statistics.median(interleaved_times({backbone: one_pass}, batches, plan.repeats)[backbone])
        results[backbone] = {"images_per_s": round(sum(len(b) for b, _ in batches) / seconds, 1),
                             "pass_s": round(seconds, 3)}
        del one_pass, batches
        release(device)
    return {"batch_size": cfg.train.batch_size, "image_size": list(cfg.data.size_hw),
            "amp": f"{cfg.runtime.amp} ({autocast_dtype(cfg.runtime.amp, device) or 'off'})",
            "channels_last": cfg.runtime.channels_last, "compile": False, "steps": plan.steps,
            "repeats": plan.repeats, "backbones": results}


def amp_settings(cfg: Config, device: torch.device) -> tuple[list[str], str]:
    """The AMP modes this device runs (off first) and the preset's (``auto``: bf16 on a GPU that has it, off on
    the CPU), which the channels_last and compile ratios are measured at."""
    modes = ["off"]
    if device.type != "cuda" or torch.cuda.is_bf16_supported():
        modes.append("bf16")
    if device.type == "cuda":
        modes.append("fp16")  # fp16 autocast needs CUDA (pipeline.training.loop.autocast_dtype)
    preset = autocast_dtype(cfg.runtime.amp, device)
    return modes, {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[preset]


def speedups(cfg: Config, plan: Plan) -> dict:
    """AMP, channels_last and torch.compile speed-ups of the first backbone: median of paired ratios."""
    device = torch_device(cfg.runtime.device)
    backbone = next(iter(cfg.backbones))
    cfg = cfg.for_backbone(backbone)
    data = kfold.load_training_data(cfg)
    batches = device_batches(cfg, data, plan.steps, device)
    modes, best = amp_settings(cfg, device)
    settings = {(mode, True, False) for mode in modes} | {(best, False, False), (best, True, True)}
    passes = {setting: training_pass(cfg, backbone, data, device, *setting) for setting in sorted(settings)}
    times = interleaved_times(passes, batches, plan.repeats)
    images = sum(len(b) for b, _ in batches)

    def ratio(faster: tuple, slower: tuple) -> float:
        return round(statistics.median(s / f for f, s in zip(times[faster], times[slower])), 3)

    ratios = {f"amp_{mode}": ratio((mode, True, False), ("off", True, False)) for mode in modes[1:]}
    ratios["channels_last"] = ratio((best, True, False), (best, False, False))
    ratios["compile"] = ratio((best, True, True), (best, True, False))
    rates = {f"amp={a} channels_last={c} compile={k}": round(images / statistics.median(t), 1)
             for (a, c, k), t in times.items()}
    del passes, batches
    torch._dynamo.reset()  # drop the compiled graphs (and the model they hold)
    release(device)
    return {"backbone": backbone, "reference_amp": best, "compile_backend": compile_backend(device),
            "images_per_s": rates, "ratios": ratios, "steps": plan.steps, "repeats": plan.repeats}


# ---------------------------------------------------------------- 2. loader efficiency, 4. TTA (benchmarks/run.py)

def loader(cfg: Config, plan: Plan) -> dict:
    result = cpu_benchmarks.loader_efficiency(cfg, steps=plan.loader_steps, repeats=plan.loader_repeats)
    release(torch_device(cfg.runtime.device))
    return result


def tta(cfg: Config, plan: Plan) -> dict:
    return cpu_benchmarks.tta_cost(cfg, plan.tta_images, plan.repeats)


# ---------------------------------------------------------------- 5. the ELPV competition from scratch

def elpv(scratch: Path, plan: Plan) -> dict:
    """prepare -> folds -> train -> infer -> features -> embed -> ensemble -> submit in this process; wall time, CV,
    Public/Private."""
    full_size = [] if plan.quick else ["data.image_size=300"]
    cfg = preset_config(scratch / "elpv", plan, *full_size, f"train.epochs={plan.epochs}", "runtime.compile=false")
    seconds, started = {}, time.perf_counter()
    for stage in (prepare, folds, train, infer, features, embed, ensemble, submit):
        stage_started = time.perf_counter()
        stage.main(cfg)
        seconds[stage.__name__.rpartition(".")[2]] = round(time.perf_counter() - stage_started, 1)
        release(torch_device(cfg.runtime.device))
    wall = round(time.perf_counter() - started, 1)
    # What the stages wrote: each backbone's CV (train), the ensemble's OOF score, the leaderboard's (submit).
    board = json.loads(layout.submission_metrics_file(cfg).read_text())
    backbones = {b: json.loads(layout.train_metrics_file(cfg, b).read_text())[f"{b}_cv"] for b in cfg.backbones}
    return {"wall_s": wall, "stage_s": seconds, "epochs": plan.epochs, "folds": cfg.folds.n_splits,
            "image_size": list(cfg.data.size_hw), "metric": cfg.metric, "backbones_cv": backbones,
            "cv": json.loads(layout.ensemble_scores_file(cfg).read_text())["ensemble_cv"],
            "public": board.get("public"), "private": board.get("private")}


# ---------------------------------------------------------------- the table

def figures(results: dict) -> dict:
    """Every measured figure as one flat name -> number (what the table shows and the tests check)."""
    flat = {}
    if "throughput" in results:
        flat |= {f"throughput/{b}": v["images_per_s"] for b, v in results["throughput"]["backbones"].items()}
    if "loader" in results:
        flat["loader_efficiency"] = results["loader"]["efficiency"]
    if "speedups" in results:
        flat |= {f"speedup/{name}": value for name, value in results["speedups"]["ratios"].items()}
    if "tta" in results:
        flat["tta_cost_per_view"] = results["tta"]["cost_per_view"]
    if "elpv" in results:
        flat |= {f"elpv/{key}": results["elpv"][key] for key in ("wall_s", "cv", "public", "private")}
    flat["total_s"] = results["total_s"]
    return flat


def label(name: str, results: dict) -> str:
    kind, _, item = name.partition("/")
    if kind == "throughput":
        sizes = results["throughput"]
        return f"training images/s, {item} (batch {sizes['batch_size']}, {sizes['image_size'][0]} px)"
    if kind == "speedup":
        return f"speed-up of {item} (img/s ratio, {results['speedups']['backbone']})"
    if kind == "elpv":
        run = results["elpv"]
        return f"ELPV from scratch, {item} ({run['epochs']} epochs, {run['folds']} folds, {run['metric']})"
    return {"loader_efficiency": "loader efficiency (real / in-memory img/s)",
            "tta_cost_per_view": f"TTA cost per view ({results.get('tta', {}).get('views')} views)",
            "total_s": "wall time of the whole benchmark (s)"}[name]


def table(results: dict) -> str:
    machine = results["machine"]
    lines = [f"{results['date']}, {machine['device_name']}, torch {machine['torch']}"
             + (" (smoke mode: tiny, not figures)" if results["quick"] else ""), "",
             "| figure | measured | target | met |", "|---|---|---|---|"]
    for name, value in results["figures"].items():
        target, check = TARGETS.get(name, ("", None))
        met = "" if check is None or value is None or results["quick"] else ("yes" if check(value) else "NO")
        shown = f"{value:.4g}" if isinstance(value, float) and abs(value) < 1e4 else value
        lines.append(f"| {label(name, results)} | {shown} | {target} | {met} |")
    return "\n".join(lines)


def machine(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    return {"device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "cores": os.cpu_count(),
            "threads": torch.get_num_threads()}


def measure(plan: Plan, only: list[str], scratch: Path) -> dict:
    """Run the chosen measurements; the shared cache and folds of the preset first (not timed as a figure)."""
    cfg = preset_config(scratch / "bench", plan)
    results, seconds = {}, {}
    if set(only) - {"elpv"}:
        print("preparing the preset's cache and folds ...", file=sys.stderr)
        prepare.main(cfg)
        folds.main(cfg)
    functions = {"throughput": lambda: throughput(cfg, plan), "loader": lambda: loader(cfg, plan),
                 "speedups": lambda: speedups(cfg, plan), "tta": lambda: tta(cfg, plan),
                 "elpv": lambda: elpv(scratch, plan)}
    for name in only:
        print(f"{name} ...", file=sys.stderr)
        started = time.perf_counter()
        results[name] = functions[name]()
        seconds[name] = round(time.perf_counter() - started, 1)
    return {**results, "measurement_s": seconds}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_device(args)
    plan = Plan(args.quick, args.device, args.epochs)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as scratch:
        results = measure(plan, [name for name in MEASUREMENTS if name in args.only], Path(scratch))
    results = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "machine": machine(torch_device(args.device)), "quick": args.quick, **results,
               "total_s": round(time.perf_counter() - started, 1)}
    results["figures"] = figures(results)
    out = args.out or (Path(tempfile.gettempdir()) / "gpu-quick.json" if args.quick else BENCHMARKS / "gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"wrote {out}", file=sys.stderr)
    bad = [name for name, value in results["figures"].items()
           if value is None or not math.isfinite(value)]
    if bad:
        print(f"figures that are not numbers: {bad}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
