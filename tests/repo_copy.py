"""The repository as a fresh git repository with the smoke preset as params.yaml: where
tests/test_dvc.py and benchmarks/run.py run ``dvc repro`` without touching the real one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.config import Paths, dump, load_config

ROOT = Path(__file__).resolve().parents[1]


def copy_repository(target: Path) -> Path:
    """The project's files as the working tree has them (tracked ones and new ones git does not ignore, its own
    .dvc included) in ``target``, committed; not the team's record (the top-level submissions and metrics), so
    that the copy's first run starts an empty leaderboard."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    record = [getattr(load_config(ROOT / "params.yaml").paths, name) for name in Paths.TOP_LEVEL]
    for name in files:
        if (ROOT / name).is_file() and Path(name).parts[0] not in record:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    smoke = load_config(ROOT / "configs" / "smoke.yaml", ["paths.work_dir=work", "tune.n_trials=1"])
    (target / "params.yaml").write_text(dump(smoke))
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"]):
        subprocess.run(command, cwd=target, check=True)
    return target


def dvc_env(repo: Path) -> dict:
    """This interpreter's tools first on PATH, analytics off, the copy's own code importable."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(repo)}


def stages_run(output: str) -> set[str]:
    """The stages ``dvc repro`` printed as run."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}
