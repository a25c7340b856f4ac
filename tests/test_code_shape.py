"""The shape of the code: stages side by side above a shared core, short functions and modules, ruff clean."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.provenance import direct_imports

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"prepare", "eda", "folds", "tune", "train", "infer", "features", "ensemble", "submit"}
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400


def pipeline_modules() -> list[Path]:
    return sorted((ROOT / "pipeline").glob("*.py"))


def long_functions(source: str, limit: int) -> list[tuple[str, int]]:
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_imports_no_other_stage(stage):
    imported = direct_imports(ROOT / "pipeline" / f"{stage}.py")
    assert not imported & (STAGES - {stage}), f"pipeline/{stage}.py imports the stage(s) {imported & STAGES}"


def test_the_core_imports_no_stage():
    for path in pipeline_modules():
        if path.stem not in STAGES:
            assert not direct_imports(path) & STAGES, f"core module {path.name} imports a stage"


def test_the_stage_check_sees_a_stage_import(tmp_path):
    module = tmp_path / "tune.py"
    module.write_text("from pipeline.train import cross_validate\nfrom pipeline import layout, ensemble\n")
    assert direct_imports(module) == {"train", "layout", "ensemble"}


@pytest.mark.parametrize("path", pipeline_modules(), ids=lambda p: p.name)
def test_functions_and_modules_are_short(path):
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{path.name} has {len(source.splitlines())} lines"
    assert long_functions(source, MAX_FUNCTION_LINES) == [], f"{path.name} has functions over {MAX_FUNCTION_LINES}"


def test_the_length_check_counts_lines():
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    assert long_functions(f"def f():\n{body}\n", 60) == [("f", 62)]
    assert long_functions("def g():\n    return 1\n", 60) == []


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
                    reason="ruff is not installed (pip install -e '.[dev]')")
def test_ruff_is_clean():
    ruff = Path(sys.executable).parent / "ruff"
    result = subprocess.run([str(ruff) if ruff.exists() else "ruff", "check", "."], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout[-3000:]


def test_the_longest_test_files_exist_and_run_first():
    from types import SimpleNamespace

    import conftest

    assert [name for name in conftest.LONGEST_FILES if not (ROOT / "tests" / name).is_file()] == []
    items = [SimpleNamespace(path=ROOT / "tests" / name, name=test) for name, test in (
        ("test_config.py", "a"), ("test_faults.py", "b"), ("test_config.py", "c"), ("test_dvc.py", "d"),
        ("test_faults.py", "e"))]
    conftest.pytest_collection_modifyitems(items)
    assert [item.name for item in items] == ["d", "b", "e", "a", "c"]  # listed files by rank, tests kept in order
