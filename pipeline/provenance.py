"""What a result was made from: the pipeline modules a module imports and a digest of their code; the git
commit, DVC experiment and config digest of a run.

The fold settings key includes the digest of ``pipeline.kfold``'s code (every module it imports,
directly or through others), so editing any code training depends on retrains the folds instead
of skipping them as already trained; ``tests/test_layout.py`` uses the same import closure to
check that ``dvc.yaml`` lists each stage's code as deps. The submit stage writes ``run_provenance`` into every
leaderboard row and Kaggle upload message, so a score can be traced to the code and settings that made it.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import subprocess
from pathlib import Path

from pipeline.overrides import mask_password

PACKAGE = Path(__file__).resolve().parent


def direct_imports(path: Path) -> set[str]:
    """The pipeline modules a source file imports (``from pipeline import x``, ``pipeline.x``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "pipeline":
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("pipeline.")}
    return names


def imported_modules(module: str, package: Path = PACKAGE) -> list[str]:
    """``module`` and every pipeline module it imports, directly or through other pipeline modules, sorted."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += direct_imports(package / f"{name}.py")
    return sorted(seen)


@functools.cache
def code_digest(module: str) -> str:
    """A digest of the source of ``module`` and of every pipeline module it imports."""
    digest = hashlib.sha256()
    for name in imported_modules(module):
        digest.update(name.encode() + b"\0" + (PACKAGE / f"{name}.py").read_bytes() + b"\0")
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- a run's commit, experiment and settings

def _git(folder: Path, *args: str) -> str | None:
    """``git args`` in ``folder``: its output, or None when git is missing or fails (not a repository)."""
    try:
        result = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def git_commit(folder: str | Path = ".", outputs: tuple | list = ()) -> str:
    """HEAD's short sha, with ``+dirty`` when a tracked file differs from it; "" outside a git repository.

    Like ``git describe --dirty``, untracked files do not count; nor do ``outputs`` (files or folders, relative
    to ``folder``): the pipeline's own git-tracked records (dvc.lock, metrics, submissions) that a run rewrites.
    """
    folder = Path(folder)
    top, head = _git(folder, "rev-parse", "--show-toplevel"), _git(folder, "rev-parse", "--short", "HEAD")
    status = _git(folder, "status", "--porcelain", "-z", "--untracked-files=no")
    if top is None or head is None or status is None:
        return ""
    skipped = [(folder / p).resolve() for p in outputs]
    # -z entries are "XY path", a rename followed by its old path as an entry of its own.
    changed = [Path(top.strip(), entry[3:] if entry[2:3] == " " else entry).resolve()
               for entry in status.split("\0") if entry]
    dirty = any(not any(path == s or s in path.parents for s in skipped) for path in changed)
    return head.strip() + ("+dirty" if dirty else "")


def experiment_name() -> str:
    """The DVC experiment being run (``dvc exp run`` sets DVC_EXP_NAME for each stage's command), else ""."""
    return os.environ.get("DVC_EXP_NAME", "")


def public_config(cfg) -> dict:
    """The resolved config as plain data for files and loggers, a database password in ``tune.storage`` masked."""
    data = cfg.model_dump(mode="json")
    if data["tune"]["storage"]:
        data["tune"]["storage"] = mask_password(data["tune"]["storage"])
    return data


def config_digest(cfg) -> str:
    """12 hex digits of the sha256 of the resolved config, its ``paths`` left out (they move outputs, not results)."""
    text = json.dumps({key: value for key, value in public_config(cfg).items() if key != "paths"}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_provenance(cfg, outputs: tuple | list = ()) -> dict:
    """``{"commit", "experiment", "config"}`` of a run in the current folder (``outputs``: see ``git_commit``)."""
    return {"commit": git_commit(".", outputs), "experiment": experiment_name(), "config": config_digest(cfg)}
