"""Benchmark: on the CPU, do folds side by side (one worker per core) train more images a second than one fold on
every core?

    python benchmarks/cpu_workers.py [--steps N] [--repeats N] [--config FILE] [key=value ...]

Times the training loop of each backbone of the config (``train_one_epoch`` on a random batch of the configured size,
channels and batch, with the model, loss and optimizer train builds) two ways, alternating ``--repeats`` times so a
slow spell of the shared machine hits both alike: in this process on all of torch's threads (``train.devices=[cpu]``),
and as one ``pipeline.training.devices`` worker per core,
all stepping at once (what ``train.devices=auto`` does on the CPU).
Prints images/s of each and their ratio (the median over the repeats); writes ``benchmarks/cpu_workers.json``.
Target: a ratio above 1 wherever ``auto`` starts workers, which is why it does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.training import fold_setup  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.training.devices import run_on_devices  # noqa: E402
from pipeline.training.loop import StepState, train_one_epoch  # noqa: E402
from pipeline.training.models import Heads, create_model  # noqa: E402

WARM_UP_STEPS = 3
CLASSES = ["a", "b", "c", "d"]


def images_per_second(device: str, cfg: Config, backbone: str, steps: int) -> float:
    """The training loop's steps (``train_one_epoch``, the backbone's model, loss and optimizer as train builds them)
    on one random uint8 batch of the configured size, after a warm-up: images a second."""
    cfg = cfg.for_backbone(backbone)
    channels, (height, width), batch = cfg.data.channels, cfg.data.size_hw, cfg.train.batch_size
    heads = Heads(CLASSES, [("target", CLASSES)])
    torch.manual_seed(0)
    model = create_model(fold_setup.timm_name(cfg, backbone), heads, channels, [0.5] * channels, [0.25] * channels)
    if cfg.runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    targets = torch.randint(0, len(CLASSES), (batch, 1))
    compute_loss, _ = fold_setup.make_loss(cfg.train, heads, targets.numpy())
    optimizer = fold_setup.make_optimizer(cfg.train, model)
    images = torch.randint(0, 256, (batch, channels, height, width), dtype=torch.uint8)

    def run(count: int) -> None:
        train_one_epoch(model, [(images, targets)] * count, optimizer, compute_loss, torch.device(device),
                        state=StepState(), channels_last=cfg.runtime.channels_last, desc="bench")

    run(WARM_UP_STEPS)
    started = time.perf_counter()
    run(steps)
    return steps * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--config", default=str(ROOT / "params.yaml"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    cores = torch.get_num_threads()
    results = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cores": cores,
               "torch": torch.__version__, "image_size": cfg.data.image_size, "batch": cfg.train.batch_size,
               "backbones": {}}
    for backbone in cfg.backbones:
        job = (cfg, backbone, args.steps)
        one, workers = [], []
        for _ in range(args.repeats):
            one.append(images_per_second("cpu", *job))
            workers.append(sum(run_on_devices(images_per_second, [job] * cores, ["cpu"] * cores, "benchmark")))
        ratios = [w / o for w, o in zip(workers, one)]
        results["backbones"][backbone] = {"one_process_images_per_s": round(statistics.median(one), 1),
                                          "workers_images_per_s": round(statistics.median(workers), 1),
                                          "ratio": round(statistics.median(ratios), 3)}
        print(f"{backbone} at {cfg.data.image_size} px, batch {cfg.train.batch_size}: one process on {cores} "
              f"thread(s) {statistics.median(one):.0f} img/s, {cores} one-thread workers "
              f"{statistics.median(workers):.0f} img/s in all: x{statistics.median(ratios):.2f}")
    (ROOT / "benchmarks" / "cpu_workers.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
