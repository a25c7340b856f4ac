"""The shape of the code: stages side by side on top, the core below them in subpackages by owner, imports that run
downward only, short functions, modules of one idea, ruff clean."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.provenance import direct_imports

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"prepare", "eda", "folds", "tune", "train", "infer", "features", "embed", "ensemble", "submit"}
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 600  # a module is as long as its one idea needs; past this it holds two
# The layers, bottom up: a module imports only from layers below its own, or inside its own subpackage; the flat
# modules of one layer (the base pieces, the shared pieces) may import each other. Peers (training, ensembling,
# analysis) never import each other.
LAYERS = [{"errors", "formula", "artifacts", "metrics"},
          {"config"},
          {"layout", "provenance", "cli", "kaggle"},
          {"data"},
          {"training", "ensembling", "analysis"},
          {"kaggle_notebook"},  # the offline kernel's script: inference, TTA and the ensemble from the core
          STAGES | {"__main__", "kaggle_package"}]
FLAT_LAYERS = (0, 2)


def pipeline_modules() -> list[Path]:
    return sorted((ROOT / "pipeline").rglob("*.py"))


def module_name(path: Path) -> str:
    """pipeline/training/kfold.py -> training.kfold; pipeline/config/__init__.py -> config."""
    parts = path.relative_to(ROOT / "pipeline").with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def upward_imports(importer: str, imported: set[str]) -> list[str]:
    """The modules of ``imported`` that ``importer`` may not import under ``LAYERS``."""
    rank = {unit: number for number, layer in enumerate(LAYERS) for unit in layer}
    unit = importer.split(".")[0]
    wrong = []
    for name in sorted(imported):
        other = name.split(".")[0]
        if other == unit:
            continue
        same_flat_layer = rank[other] == rank[unit] and rank[unit] in FLAT_LAYERS
        if rank[other] > rank[unit] or (rank[other] == rank[unit] and not same_flat_layer):
            wrong.append(name)
    return wrong


def long_functions(source: str, limit: int) -> list[tuple[str, int]]:
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_imports_no_other_stage(stage):
    imported = direct_imports(ROOT / "pipeline" / f"{stage}.py")
    assert not imported & (STAGES - {stage}), f"pipeline/{stage}.py imports the stage(s) {imported & STAGES}"


def test_the_core_imports_no_stage():
    for path in pipeline_modules():
        if module_name(path) not in STAGES:
            assert not direct_imports(path) & STAGES, f"core module {path.name} imports a stage"


def test_every_module_sits_in_a_layer_and_imports_only_downward():
    for path in pipeline_modules():
        name = module_name(path)
        if name == "__init__":
            continue
        assert any(name.split(".")[0] in layer for layer in LAYERS), f"pipeline/{name} is in no layer of LAYERS"
        assert upward_imports(name, direct_imports(path)) == [], f"pipeline/{name} imports upward or sideways"


def test_the_layer_check_sees_an_upward_or_sideways_import():
    assert upward_imports("training.kfold", {"ensembling.voting", "data.images", "training.loop"}) == [
        "ensembling.voting"]
    assert upward_imports("data.images", {"training.models", "layout", "config"}) == ["training.models"]
    assert upward_imports("config.sections", {"layout"}) == ["layout"]
    assert upward_imports("artifacts", {"errors"}) == [] and upward_imports("cli", {"layout"}) == []
    assert upward_imports("train", {"infer"}) == ["infer"]


def test_every_subpackage_says_what_it_owns_and_may_import():
    for init in sorted((ROOT / "pipeline").glob("*/__init__.py")):
        docstring = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import" in docstring, f"{init.relative_to(ROOT)} does not say what it may import"


def test_the_stage_check_sees_a_stage_import(tmp_path):
    module = tmp_path / "tune.py"
    module.write_text("from pipeline.train import cross_validate\nfrom pipeline import layout, ensemble\n")
    assert direct_imports(module) == {"train", "layout", "ensemble"}


@pytest.mark.parametrize("path", pipeline_modules(), ids=module_name)
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
