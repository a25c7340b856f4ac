"""What a result was made from: the pipeline modules a module imports and a digest of their code; the git
commit, DVC experiment and config digest of a run.

Modules are named by their dotted path under ``pipeline`` (``layout``, ``training.kfold``; a subpackage's
``__init__`` by the subpackage's name, ``config``). The fold settings key includes ``training_code_digest()``: the
parsed code (comments and docstrings left out) of the modules training computes with, so a fixed typo retrains
nothing while an edit to the loss or the optimizer retrains every fold. ``tests/test_layout.py`` uses the same
import closure to check that ``dvc.yaml`` lists each stage's code as deps. The submit stage writes
``run_provenance`` into every leaderboard row and Kaggle upload message, so a score can be traced to the code and
settings that made it.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import subprocess
from pathlib import Path

from pipeline.config.loading import mask_password

PACKAGE = Path(__file__).resolve().parent

# What a trained fold's result depends on, as code: the k-fold loop and everything it imports from these
# subpackages and modules. Left out: where files go and how they are named (layout, artifacts), the config's
# loading (its values are in the key themselves), messages and the command line.
TRAINING_PACKAGES, TRAINING_MODULES = ("training", "data"), ("metrics", "formula")


def module_file(name: str, package: Path = PACKAGE) -> Path:
    """``training.kfold`` -> pipeline/training/kfold.py; a subpackage's name -> its ``__init__.py``."""
    path = package.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _module_name(dotted: str, package: Path) -> str | None:
    """``pipeline.a.b`` -> ``a.b`` when that is a module or subpackage of ``package``; else None."""
    parts = dotted.split(".")[1:]
    return ".".join(parts) if parts and module_file(".".join(parts), package).exists() else None


def direct_imports(path: Path, package: Path = PACKAGE) -> set[str]:
    """The pipeline modules a source file imports (``from pipeline import x``, ``from pipeline.a.b import y``,
    ``import pipeline.a``), a submodule's subpackage (its ``__init__`` runs first) included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            for alias in node.names:  # `from pipeline.a import b`: b is a module of a, or a name a defines
                names.add(_module_name(f"{node.module}.{alias.name}", package) or _module_name(node.module, package))
        elif isinstance(node, ast.Import):
            names |= {_module_name(a.name, package) for a in node.names if a.name.startswith("pipeline.")}
    names.discard(None)
    return names | {name.rsplit(".", 1)[0] for name in names if "." in name}


def imported_modules(module: str, package: Path = PACKAGE) -> list[str]:
    """``module`` and every pipeline module it imports, directly or through other pipeline modules, sorted."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += direct_imports(module_file(name, package), package)
    return sorted(seen)


def _without_docstrings(tree: ast.AST) -> ast.AST:
    """The tree with every module, class and function docstring removed (comments are never in it)."""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


def code_text(path: Path) -> str:
    """A module's code as its parsed syntax tree: the same for two sources that differ in comments, docstrings,
    blank lines or line breaks, different for any change to what runs."""
    return ast.dump(_without_docstrings(ast.parse(path.read_text())), include_attributes=False)


def code_digest(modules, package: Path = PACKAGE) -> str:
    """A digest of the parsed code of ``modules`` (dotted names)."""
    digest = hashlib.sha256()
    for name in sorted(modules):
        digest.update(name.encode() + b"\0" + code_text(module_file(name, package)).encode() + b"\0")
    return digest.hexdigest()[:16]


@functools.cache
def training_code_digest(module: str = "training.kfold", package: Path = PACKAGE) -> str:
    """The digest of the training code ``module`` computes with: it and the modules it imports that are in
    ``TRAINING_PACKAGES`` or ``TRAINING_MODULES`` (``tune``: the stage's objective and the training it runs)."""
    return code_digest([name for name in imported_modules(module, package) if name == module
                        or name.split(".")[0] in TRAINING_PACKAGES or name in TRAINING_MODULES], package)


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
