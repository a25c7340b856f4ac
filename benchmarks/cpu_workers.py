"""Benchmark: on the CPU, do folds side by side (one worker per core) train more images a second than one fold on
every core?

    python benchmarks/cpu_workers.py [--steps N] [--repeats N] [--config FILE] [key=value ...]

Times the training step of each backbone of the config (random images of the configured size and channels, the
configured batch, AdamW, channels_last as configured) two ways, alternating ``--repeats`` times so a slow spell of the
shared machine hits both alike: in this process on all of torch's threads (``train.devices=[cpu]``), and as one
``pipeline.devices`` worker per core, all stepping at once (what ``train.devices=auto`` does on the CPU). Prints
images/s of each and their ratio (the median over the repeats); writes ``benchmarks/cpu_workers.json``. Target: a
ratio above 1 wherever ``auto`` starts workers, which is why it does.
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

from pipeline.config import load_config  # noqa: E402
from pipeline.devices import run_on_devices  # noqa: E402

WARM_UP_STEPS = 3


def images_per_second(device: str, name: str, size: int, channels: int, batch: int, steps: int,
                      channels_last: bool) -> float:
    """Training steps of timm model ``name`` on random batches, after a warm-up: images a second."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4, in_chans=channels)
    images = torch.rand(batch, channels, size, size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 4, (batch,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step in range(WARM_UP_STEPS + steps):
        if step == WARM_UP_STEPS:
            started = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
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
        name = cfg.for_backbone(backbone).train.model or backbone
        job = (name, cfg.data.image_size, cfg.data.channels, cfg.train.batch_size, args.steps,
               cfg.runtime.channels_last)
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
