"""benchmarks/gpu.py: it refuses a machine without CUDA in one line, and its smoke mode measures every figure."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
NO_CUDA = ("no CUDA device: the GPU benchmark measures nothing on the CPU "
           "(run it where torch.cuda.is_available())")
# What the smoke mode measures on the CPU (fp16 autocast needs CUDA, so no speedup/amp_fp16 there), besides one
# throughput/<backbone>.
CPU_FIGURES = {"loader_efficiency", "speedup/amp_bf16", "speedup/channels_last", "speedup/compile",
               "tta_cost_per_view", "elpv/wall_s", "elpv/cv", "elpv/public", "elpv/private", "total_s"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the benchmark would run")
def test_without_cuda_it_exits_2_with_one_line():
    result = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == NO_CUDA
    assert "Traceback" not in result.stderr
    assert result.stdout == ""  # no table: nothing was measured


@pytest.mark.slow
def test_the_smoke_mode_writes_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| figure | measured | target | met |" in result.stdout
    results = json.loads(out.read_text())
    figures = results["figures"]
    throughput = {name: value for name, value in figures.items() if name.startswith("throughput/")}
    assert len(throughput) == 1, figures  # the smoke mode's one backbone
    assert CPU_FIGURES - set(figures) == set(), f"figures missing: {CPU_FIGURES - set(figures)}"
    assert set(figures) - CPU_FIGURES - set(throughput) == set(), "a figure the CPU cannot measure"
    not_numbers = {name: value for name, value in figures.items()
                   if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)}
    assert not_numbers == {}
    assert all(value > 0 for value in throughput.values())
    assert all(figures[name] > 0 for name in CPU_FIGURES if name.startswith(("speedup/", "loader", "tta")))
    for score in ("elpv/cv", "elpv/public", "elpv/private"):
        assert 0 <= figures[score] <= 1, (score, figures[score])
    assert results["elpv"]["epochs"] == 1 and results["elpv"]["folds"] == 2
    assert results["quick"] is True
    assert results["machine"]["device_name"] and results["machine"]["torch"] and results["date"]
