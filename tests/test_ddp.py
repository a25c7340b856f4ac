"""One model across processes: `torchrun --nproc-per-node 2 -m pipeline.train` with DistributedDataParallel on the
CPU (gloo), on the smoke settings: killed mid-fold it resumes from last.pt, it finishes with one set of outputs
written by rank 0, and its CV matches a single-process run within noise."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import torch
from conftest import ROOT, make_config

from pipeline import folds, prepare, train
from pipeline.layout import overrides_under
from pipeline.training.distributed import RankBatchSampler

SETTINGS = ("backbones=[lcnet_050]", "train.epochs=3", "train.lr=1e-3")  # a rate that does not diverge in 9 steps


def torchrun(work: Path) -> list[str]:
    """The README's command, on the smoke preset with every output in ``work``."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "pipeline.train",
            "--backbone", "lcnet_050", "--config", str(ROOT / "configs" / "smoke.yaml"), *overrides_under(work),
            *SETTINGS]


def test_rank_batches_together_are_the_single_process_batches():
    sampler = list(range(10))  # the global order every rank draws the same
    ranks = [list(RankBatchSampler(sampler, 4, drop_last=True, rank=r, world=2)) for r in (0, 1)]
    assert ranks == [[[0, 2], [4, 6]], [[1, 3], [5, 7]]]  # batches [0..3] and [4..7]; 8, 9 dropped
    assert len(RankBatchSampler(sampler, 4, drop_last=True, rank=0, world=2)) == 2
    kept = [list(RankBatchSampler(sampler, 4, drop_last=False, rank=r, world=2)) for r in (0, 1)]
    assert kept[0][-1] == [8] and kept[1][-1] == [9] and len(RankBatchSampler(sampler, 4, False, 0, 2)) == 3


@pytest.mark.slow
def test_torchrun_trains_each_fold_across_two_processes_and_resumes(tmp_path):
    single = tmp_path / "single" / "work"
    cfg = make_config(single, *SETTINGS)
    prepare.main(cfg)
    folds.main(cfg)
    work = tmp_path / "ddp" / "work"
    shutil.copytree(single, work)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    log = tmp_path / "ddp.log"
    last = work / "models" / "lcnet_050" / "fold0" / "last.pt"
    process = subprocess.Popen(torchrun(work), stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env,
                               start_new_session=True)
    try:  # killed once fold 0 has saved an epoch: every rank goes
        deadline = time.monotonic() + 300
        while not last.exists():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
    finally:  # torchrun's workers live in sessions of their own: kill the whole tree, as a crash would
        for victim in [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.send_signal(signal.SIGKILL)
        process.wait()
    epoch = torch.load(last, weights_only=True)["epoch"]
    assert epoch < 2, "fold 0 had finished: nothing left to resume"

    result = subprocess.run(torchrun(work), capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"fold 0: resuming from {last} at epoch {epoch + 2}/3" in result.stderr, result.stderr[:1500]
    # Rank 0 speaks and writes for both: each epoch line once, one set of fold folders and logs.
    assert result.stderr.count("fold 1 epoch 3/3") == 1
    assert sorted(p.name for p in (work / "models" / "lcnet_050").iterdir()) == ["fold0", "fold1"]
    assert sorted(p.name for p in (work / "logs" / "dvclive" / "lcnet_050").iterdir()) == ["fold0", "fold1"]
    oof = pd.read_parquet(work / "oof" / "lcnet_050.parquet")
    assert sorted(oof["id"]) == sorted(pd.read_csv(work / "folds.csv")["id"]) and oof["id"].is_unique

    report = train.main(cfg)["lcnet_050"]  # the same folds in one process
    ddp = pd.read_json(work / "metrics" / "lcnet_050.json", typ="series")
    assert abs(ddp["lcnet_050_cv"] - report["cv"]) < 0.15  # smoke noise: 96 images per fold, 3 epochs
    single_oof = pd.read_parquet(single / "oof" / "lcnet_050.parquet")
    classes = [c for c in oof.columns if c not in ("id", "fold")]
    assert np.abs(oof[classes].to_numpy() - single_oof[classes].to_numpy()).mean() < 0.1
