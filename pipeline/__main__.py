"""The front door: ``python -m pipeline STAGE [--config FILE] [key.sub=value ...]``, or ``pipeline STAGE ...``.

Runs the stage module's own command line (``python -m pipeline.STAGE ...``) by name. A stage is imported only
when it runs (with runpy, as ``python -m`` does), so ``--help`` is instant and this entry point, which sits
above the stages, imports none of them.
"""

from __future__ import annotations

import ast
import runpy
import sys
from pathlib import Path

from pipeline.layout import STAGES

PACKAGE = Path(__file__).resolve().parent


def summary(stage: str) -> str:
    """The first line of a stage module's docstring, read without importing it (torch takes seconds)."""
    docstring = ast.get_docstring(ast.parse((PACKAGE / f"{stage}.py").read_text())) or ""
    return docstring.splitlines()[0].removeprefix(f"Stage {stage}: ") if docstring else ""


def usage() -> str:
    width = max(len(stage) for stage in STAGES)
    lines = "\n".join(f"  {stage:<{width}}  {summary(stage)}" for stage in STAGES)
    return (f"usage: python -m pipeline STAGE [--config FILE] [key.sub=value ...]   (or: pipeline STAGE ...)\n\n"
            f"stages, in the order dvc.yaml chains them:\n{lines}\n\n"
            f"`python -m pipeline STAGE --help`: what the stage reads and writes, and its options.")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        raise SystemExit(0 if argv else 2)
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"error: no stage {stage!r}; the stages are {', '.join(STAGES)}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    sys.argv = [f"pipeline {stage}", *rest]
    runpy.run_module(f"pipeline.{stage}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
