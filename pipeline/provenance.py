"""What a result was made from: the pipeline modules a module imports, and a digest of their code.

The fold settings key includes the digest of ``pipeline.kfold``'s code (every module it imports,
directly or through others), so editing any code training depends on retrains the folds instead
of skipping them as already trained; ``tests/test_layout.py`` uses the same import closure to
check that ``dvc.yaml`` lists each stage's code as deps.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

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
