"""A preset runs through DVC: `python -m pipeline.config --config PRESET --write params.yaml`, then `dvc repro`.

The GPU preset, shrunk to seconds on the CPU (tiny images, 240 images, one epoch, no pretrained weights,
no AMP), runs the whole chain this way on every CI run, so its backbones (names with a pretrained tag's dot),
EMA, mixup/cutmix, channels_last, the heavy augmentation and its TTA views cannot rot unseen."""

import subprocess
import sys

import pandas as pd
import pytest
from repo_copy import copy_repository, dvc_env, stages_run

from pipeline import layout
from pipeline.config import load_config

pytestmark = pytest.mark.slow

# What makes configs/gpu.yaml a CPU smoke run; everything else (backbones, EMA, mixup, cutmix, augment,
# channels_last, the search space) stays the preset's. TTA keeps one of its transforms (hflip: 2 views instead of
# the 16 of all three; every transform is tested in tests/test_infer.py), and the folds train in this process (a
# CPU worker per core would start longer than they take; tests/test_devices.py runs workers). The features member
# keeps the preset's patch and stride but learns the smoke preset's 16 filters from 2,000 patches (256 from 100,000:
# 12 s on one core). The embed member reads the 32 px cache with Lite0 alone.
SHRINK = ["paths.work_dir=work", "data.image_size=32", "data.elpv_size=240", "data.workers=1", "folds.n_splits=2",
          "train.epochs=1", "train.batch_size=16", "train.pretrained=false", "train.freeze_epochs=0",
          "tune.n_trials=1", "tune.epochs=1", "tune.folds=[0]", "train.devices=[cpu]", "runtime.amp=off",
          "runtime.compile=false", "runtime.eval_batch_size=32", "infer.tta=[hflip]", "features.clusters=16",
          "features.patches=2000",
          "embed.image_size=32", "embed.backbones=[efficientnet_lite0]"]


def run(args, cwd):
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=dvc_env(cwd))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_the_gpu_preset_shrunk_runs_the_whole_chain_through_dvc(tmp_path):
    repo = copy_repository(tmp_path / "repo")
    run([sys.executable, "-m", "pipeline.config", "--config", "configs/gpu.yaml", "--write", "params.yaml", *SHRINK],
        repo)
    preset = load_config(repo / "params.yaml")
    assert preset.train.ema and preset.train.mixup > 0 and preset.train.augment == "heavy"
    names = list(preset.backbones)
    assert names == ["convnext_tiny_fb_in22k", "efficientnet_b2_ra_in1k", "resnet50_a1_in1k"]

    ran = stages_run(run(["dvc", "repro"], repo))
    # The per-backbone stages follow the preset's backbones, not the defaults'.
    assert {f"{stage}@{name}" for stage in ("tune", "train", "infer") for name in names} <= ran
    assert not any("lcnet_050" in stage for stage in ran)
    submission = pd.read_csv(repo / layout.latest_submission_file(preset))
    sample = pd.read_csv(repo / layout.competition_dir(preset) / "sample_submission.csv")
    assert submission["id"].tolist() == sample["id"].tolist()
    # Nothing changed: only prepare looks again.
    assert stages_run(run(["dvc", "repro"], repo)) == {"prepare"}
