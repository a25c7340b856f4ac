"""Benchmarks: does the loader starve the model, does TTA cost only its views, does prepare stream?

    python benchmarks/run.py [--quick] [--config FILE] [key=value ...]

Prints a table of every figure with its target and writes ``benchmarks/results.json``.
Every figure is the median of several repetitions, and every ratio is taken between
measurements of the same run, so a noisy shared machine moves both sides alike.

- loader efficiency: training images/s through the real path (memory-mapped cache,
  Dataset, augmentation per image or per batch, DataLoader, the training step) / images/s of the same model and
  step on batches already in memory. Target >= 0.95 on the CPU (>= 0.90 on a GPU).
- TTA: seconds of k views / (k x seconds of one plain pass). Target <= 1.1.
- prepare: images/s, and the peak memory (RSS of the process tree) of a synthetic
  competition of N and 10 x N images. Target: the peak does not grow with N (ratio <= 1.2).
- epoch cost: seconds per training image at three dataset sizes. Target: linear
  (per-image cost within 15% across sizes).
- no-op re-runs: prepare, folds and train again with nothing changed, and a second `dvc repro`
  (every stage) on the smoke preset. Target: seconds, nothing recomputed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the repository copy that tests/test_dvc.py runs dvc in

from pipeline import folds, prepare  # noqa: E402
from pipeline.training import fold_setup, kfold  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.training.loop import StepState, torch_device, train_one_epoch  # noqa: E402
from pipeline.infer import predict_views, tta_transforms  # noqa: E402
from pipeline.layout import overrides_under  # noqa: E402
from pipeline.training.models import ProbabilityModel, create_model  # noqa: E402
from repo_copy import copy_repository, dvc_env, stages_run  # noqa: E402


def median_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# ---------------------------------------------------------------- loader efficiency

def loader_efficiency(cfg: Config, steps: int, repeats: int) -> dict:
    """Images/s of the real training path vs the same step on in-memory batches."""
    backbone = next(iter(cfg.backbones))
    cfg = cfg.for_backbone(backbone)
    data = kfold.load_training_data(cfg)
    device = torch_device(cfg.runtime.device)
    indices = np.arange(min(len(data.ids), steps * cfg.train.batch_size))
    model = create_model(fold_setup.timm_name(cfg, backbone), data.heads, cfg.data.channels, data.mean,
                         data.std).to(device)
    if cfg.runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    compute_loss, losses = fold_setup.make_loss(cfg.train, data.heads, data.targets[indices])
    optimizer = fold_setup.make_optimizer(cfg.train, model)
    loader = fold_setup.make_train_loader(cfg, data, indices, device, seed=0)
    batch_augment = fold_setup.make_batch_augment(cfg, seed=0)  # None when the preset runs per image
    augmented = batch_augment or (lambda images: images.clone())
    # The same number of batches, decoded and augmented once beforehand: the model's own speed.
    in_memory = [(augmented(images), targets.clone()) for images, targets in loader]
    images_per_pass = sum(len(images) for images, _ in in_memory)

    def real():
        train_one_epoch(model, loader, optimizer, compute_loss, device, state=StepState(),
                        channels_last=cfg.runtime.channels_last, batch_augment=batch_augment, desc="bench real")

    def memory():
        train_one_epoch(model, in_memory, optimizer, compute_loss, device, state=StepState(),
                        channels_last=cfg.runtime.channels_last, desc="bench memory")

    memory()  # warm-up: allocator, kernels, thread pools
    real_times, memory_times = [], []
    for _ in range(repeats):  # interleaved, so a slow moment of the machine hits both
        real_times.append(median_time(real, 1))
        memory_times.append(median_time(memory, 1))
    real_rate = images_per_pass / statistics.median(real_times)
    memory_rate = images_per_pass / statistics.median(memory_times)
    # Each real pass against the in-memory pass right after it, then the median of those ratios:
    # a slow spell of the shared machine moves both sides of a pair, not the figure.
    efficiency = statistics.median(memory / real for real, memory in zip(real_times, memory_times))
    return {"backbone": backbone, "augment": cfg.train.augment, "image_size": list(cfg.data.size_hw),
            "batch_size": cfg.train.batch_size, "workers": fold_setup.loader_settings(cfg, device)["num_workers"],
            "device": device.type, "real_images_per_s": round(real_rate, 1),
            "in_memory_images_per_s": round(memory_rate, 1), "efficiency": round(efficiency, 3),
            "repeats": repeats}


# ---------------------------------------------------------------- TTA cost

def tta_cost(cfg: Config, images_count: int, repeats: int) -> dict:
    backbone = next(iter(cfg.backbones))
    from pipeline.data.images import Cache
    from pipeline.training.models import Heads

    cache = Cache.open(cfg)
    heads = Heads(cache.class_names, [("target", cache.class_names)])
    device = torch_device(cfg.runtime.device)  # the device the stages run on (the GPU's, on a GPU machine)
    model = ProbabilityModel(create_model(fold_setup.timm_name(cfg.for_backbone(backbone), backbone), heads,
                                          cfg.data.channels, cache.mean, cache.std), heads).to(device).eval()
    images = cache.images("train")
    indices = np.arange(min(images_count, len(images)))
    compose = tta_transforms(cfg.infer.tta, cfg.data.size_hw)
    views = len(compose) if compose is not None else 1
    batch_size = cfg.runtime.eval_batch_size
    plain = median_time(lambda: predict_views(model, images, indices, None, device, batch_size), repeats)
    tta = median_time(lambda: predict_views(model, images, indices, compose, device, batch_size), repeats)
    return {"backbone": backbone, "device": device.type, "tta": cfg.infer.tta, "views": views,
            "plain_s": round(plain, 3), "tta_s": round(tta, 3), "cost_per_view": round(tta / (views * plain), 3)}


# ---------------------------------------------------------------- prepare: throughput and flat memory

def synthetic_competition(root: Path, count: int, size: int = 96) -> Path:
    """``count`` random grayscale PNGs in a Kaggle layout (10% test)."""
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(0)
    test_count = max(1, count // 10)
    for folder in ("train", "test"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 255, (size, size), dtype=np.uint8)
    for index in range(count):
        split = "test" if index < test_count else "train"
        Image.fromarray(np.roll(base, index, axis=1)).save(root / split / f"i{index:06d}.png", compress_level=1)
    ids = [f"i{index:06d}" for index in range(count)]
    pd.DataFrame({"id": ids[test_count:], "label": [f"c{i % 4}" for i in range(count - test_count)]}).to_csv(
        root / "train.csv", index=False)
    pd.DataFrame({"id": ids[:test_count], "label": "c0"}).to_csv(root / "sample_submission.csv", index=False)
    return root


def peak_rss_of(command: list[str]) -> tuple[float, float]:
    """Run ``command``; return (seconds, peak resident memory in MiB of it and its children together)."""
    import psutil

    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    watched = psutil.Process(process.pid)
    started = time.perf_counter()
    while process.poll() is None:
        try:
            tree = [watched, *watched.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}")
    return time.perf_counter() - started, peak / 2 ** 20


def prepare_scaling(small: int, scratch: Path) -> dict:
    results = {}
    for count in (small, 10 * small):
        comp = synthetic_competition(scratch / f"comp{count}", count)
        command = [sys.executable, "-m", "pipeline.prepare", "--config", str(ROOT / "params.yaml"),
                   "data.source=folder", f"data.dir={comp}", f"paths.work_dir={scratch / f'work{count}'}"]
        seconds, peak = peak_rss_of(command)
        stats = json.loads((scratch / f"work{count}" / "cache" / "stats.json").read_text())
        results[count] = {"seconds": round(seconds, 2), "images_per_s": stats["images_per_second"],
                          "peak_rss_mib": round(peak, 1)}
    counts = sorted(results)
    results["peak_ratio"] = round(results[counts[1]]["peak_rss_mib"] / results[counts[0]]["peak_rss_mib"], 3)
    return results


# ---------------------------------------------------------------- epoch cost and no-op re-runs

def epoch_scaling(cfg: Config, sizes: list[int], repeats: int) -> dict:
    backbone = next(iter(cfg.backbones))
    cfg = cfg.for_backbone(backbone)
    data = kfold.load_training_data(cfg)
    device = torch_device(cfg.runtime.device)
    model = create_model(fold_setup.timm_name(cfg, backbone), data.heads, cfg.data.channels, data.mean,
                         data.std).to(device)
    optimizer = fold_setup.make_optimizer(cfg.train, model)
    compute_loss, _ = fold_setup.make_loss(cfg.train, data.heads, data.targets)
    per_image = {}
    warm = fold_setup.make_train_loader(cfg, data, np.arange(min(sizes[0], len(data.ids))), device, seed=0)
    batch_augment = fold_setup.make_batch_augment(cfg, seed=0)
    train_one_epoch(model, warm, optimizer, compute_loss, device, state=StepState(), batch_augment=batch_augment,
                    desc="bench warm-up")
    loaders = {size: fold_setup.make_train_loader(cfg, data, np.arange(min(size, len(data.ids))), device, seed=0)
               for size in sizes}
    times = {size: [] for size in sizes}
    for _ in range(repeats):  # sizes round-robin, so a slow spell of the machine hits every size alike
        for size, loader in loaders.items():
            times[size].append(median_time(lambda loader=loader: train_one_epoch(
                model, loader, optimizer, compute_loss, device, state=StepState(), batch_augment=batch_augment,
                desc="bench epoch"), 1))
    for size, loader in loaders.items():
        seconds = statistics.median(times[size])
        count = len(loader.dataset)
        per_image[size] = {"epoch_s": round(seconds, 3), "ms_per_image": round(1000 * seconds / count, 3)}
    costs = [v["ms_per_image"] for v in per_image.values()]
    return {"backbone": backbone, "sizes": per_image, "spread": round(max(costs) / min(costs), 3)}


def no_op_reruns(scratch: Path) -> dict:
    """Each stage with its own skip logic, run a second time with nothing changed.

    ``skipped`` is what the stage itself reported (prepare: the cache is up to date; train: every
    fold skipped); folds is recomputed by design (milliseconds), so for it the figure is that the
    second run rewrote the same bytes.
    """
    work = scratch / "noop"
    base = [sys.executable, "-m"]
    args = ["--config", str(ROOT / "configs" / "smoke.yaml"), *overrides_under(work), "backbones=[lcnet_050]"]
    timings = {}
    for stage in ("pipeline.prepare", "pipeline.folds", "pipeline.train"):
        subprocess.run([*base, stage, *args], check=True, capture_output=True)
        name = stage.split(".")[1]
        folds_file = work / "folds.csv"
        before = folds_file.read_bytes() if name == "folds" else None
        started = time.perf_counter()
        output = subprocess.run([*base, stage, *args], check=True, capture_output=True, text=True)
        seconds = round(time.perf_counter() - started, 2)
        if name == "prepare":
            skipped = "up to date" in output.stderr
        elif name == "folds":
            skipped = before == folds_file.read_bytes()
        else:
            skipped = output.stderr.count("skipped") >= 2  # one line per fold of the smoke preset's 2
        timings[name] = {"second_run_s": seconds, "skipped": skipped}
    return timings


def dvc_no_op(scratch: Path) -> dict:
    """``dvc repro`` twice on a copy of the repository with the smoke preset as params.yaml: the
    second run must run no stage but prepare (which always looks at the images, finds them unchanged and
    leaves the cache alone)."""
    repo = copy_repository(scratch / "repo")

    def repro() -> tuple[float, set[str]]:
        started = time.perf_counter()
        result = subprocess.run(["dvc", "repro"], cwd=repo, capture_output=True, text=True, env=dvc_env(repo),
                                check=True)
        return round(time.perf_counter() - started, 2), stages_run(result.stdout + result.stderr)

    first_s, first_ran = repro()
    second_s, second_ran = repro()
    return {"first_run_s": first_s, "stages": len(first_ran), "second_run_s": second_s,
            "stages_rerun": sorted(second_ran - {"prepare"})}


# ---------------------------------------------------------------- the table

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and a smaller prepare test")
    parser.add_argument("--config", default=str(ROOT / "params.yaml"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    repeats = 3 if args.quick else 5
    print("preparing the default cache and folds ...", file=sys.stderr)
    prepare.main(cfg)
    folds.main(cfg)
    results = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "machine": {"cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
                           "torch": torch.__version__, "threads": torch.get_num_threads()},
               "quick": args.quick}
    print("loader efficiency ...", file=sys.stderr)
    results["loader"] = loader_efficiency(cfg, steps=12 if args.quick else 30, repeats=2 * repeats + 1)
    print("TTA cost ...", file=sys.stderr)
    results["tta"] = tta_cost(cfg, 256 if args.quick else 512, repeats)
    print("epoch scaling ...", file=sys.stderr)
    results["epoch"] = epoch_scaling(cfg, [256, 512, 1024] if args.quick else [400, 800, 1600], repeats)
    with tempfile.TemporaryDirectory() as scratch:
        print("prepare scaling ...", file=sys.stderr)
        # Both sizes above prepare's threshold for worker processes, so the two runs differ in N only.
        results["prepare"] = prepare_scaling(1200 if args.quick else 2000, Path(scratch))
        print("no-op re-runs ...", file=sys.stderr)
        results["no_op"] = no_op_reruns(Path(scratch))
        print("dvc repro no-op ...", file=sys.stderr)
        results["dvc_no_op"] = dvc_no_op(Path(scratch))
    (ROOT / "benchmarks" / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


def table(results: dict) -> str:
    loader, tta, epoch, prep, noop, dvc = (results[k] for k in ("loader", "tta", "epoch", "prepare", "no_op",
                                                                 "dvc_no_op"))
    counts = sorted(k for k in prep if isinstance(k, int) or str(k).isdigit())
    small, large = prep[counts[0]], prep[counts[-1]]
    rows = [
        ("loader efficiency (real / in-memory img/s)",
         f"{loader['efficiency']:.3f} ({loader['real_images_per_s']:.0f} / {loader['in_memory_images_per_s']:.0f}, "
         f"{loader['backbone']}, {loader['augment']})", ">= 0.95 CPU, >= 0.90 GPU",
         loader["efficiency"] >= (0.95 if loader["device"] == "cpu" else 0.90)),
        (f"TTA cost per view ({tta['views']} views)", f"{tta['cost_per_view']:.3f} ({tta['tta_s']}s vs "
         f"{tta['views']} x {tta['plain_s']}s)", "<= 1.1", tta["cost_per_view"] <= 1.1),
        ("prepare images/s", f"{small['images_per_s']} ({counts[0]}), {large['images_per_s']} ({counts[-1]})",
         "reported", True),
        (f"prepare peak memory {counts[0]} -> {counts[-1]} images",
         f"{small['peak_rss_mib']} -> {large['peak_rss_mib']} MiB (x{prep['peak_ratio']})", "x <= 1.2",
         prep["peak_ratio"] <= 1.2),
        ("epoch ms/image at " + ", ".join(str(s) for s in epoch["sizes"]),
         ", ".join(str(v["ms_per_image"]) for v in epoch["sizes"].values()) + f" (spread x{epoch['spread']})",
         "spread <= 1.15", epoch["spread"] <= 1.15),
        *[(f"no-op re-run: {stage}", f"{v['second_run_s']}s ({'skipped' if v['skipped'] else 'RECOMPUTED'})",
           "seconds, skipped", v["skipped"] and v["second_run_s"] < 30) for stage, v in noop.items()],
        (f"no-op `dvc repro` (smoke preset, {dvc['stages']} stages)",
         f"{dvc['second_run_s']}s, stages re-run: {', '.join(dvc['stages_rerun']) or 'none'} "
         f"(first run {dvc['first_run_s']}s)", "seconds, none but prepare re-run",
         not dvc["stages_rerun"] and dvc["second_run_s"] < 30),
    ]
    machine = results["machine"]
    lines = [f"{results['date']}, {machine['cores']} cores, GPU: {machine['gpu']}, torch {machine['torch']}", "",
             "| figure | measured | target | met |", "|---|---|---|---|"]
    lines += [f"| {name} | {value} | {target} | {'yes' if ok else 'NO'} |" for name, value, target, ok in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
