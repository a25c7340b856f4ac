"""dvc.yaml agrees with the code: every out is a path pipeline.layout names, every stage's code deps are
the pipeline modules its script imports (directly or through other modules)."""

import re
from pathlib import Path

import pytest
import yaml

from pipeline import layout
from pipeline.config import load_config
from pipeline.provenance import PACKAGE, imported_modules, module_file

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["prepare", "eda", "folds", "tune", "train", "infer", "features", "embed", "ensemble", "submit"]
PER_BACKBONE = {"tune", "train", "infer"}


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def render(text: str, params: dict, key: str | None = None) -> str:
    """DVC's ``${a.b}`` interpolation from params.yaml (and ``${key}`` of a foreach stage)."""
    def lookup(match):
        name = match.group(1)
        if name == "key":
            return key
        value = params
        for part in name.split("."):
            value = value[part]
        return str(value)

    return re.sub(r"\$\{([^}]+)\}", lookup, text)


def entries(items) -> list[str]:
    """Paths of a dvc.yaml outs/deps/metrics list (plain strings or one-key mappings)."""
    return [next(iter(item)) if isinstance(item, dict) else item for item in items or []]


def stage_body(stage: str) -> dict:
    body = dvc_stages()[stage]
    return body["do"] if "foreach" in body else body


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_outs_are_the_layout_paths(stage):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    cfg = load_config(ROOT / "params.yaml")
    body = stage_body(stage)
    backbones = list(cfg.backbones) if stage in PER_BACKBONE else [None]
    for backbone in backbones:
        declared = sorted(render(p, params, backbone)
                          for key in ("outs", "metrics", "plots") for p in entries(body.get(key)))
        expected = sorted(str(p) for p in layout.stage_outputs(cfg, stage, backbone))
        assert declared == expected, f"dvc.yaml's {stage} outs differ from layout.stage_outputs"


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_code_deps_are_the_imported_modules(stage):
    declared = {p for p in entries(stage_body(stage)["deps"]) if p.startswith("pipeline/")}
    expected = {str(module_file(name).relative_to(PACKAGE.parent)) for name in imported_modules(stage)}
    assert declared == expected, (
        f"dvc.yaml's {stage} code deps should be exactly the modules pipeline/{stage}.py imports")


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_data_deps_are_the_layout_inputs(stage):
    """What a stage's --help says it reads is what dvc.yaml makes it depend on."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    cfg = load_config(ROOT / "params.yaml")
    body = stage_body(stage)
    for backbone in list(cfg.backbones) if stage in PER_BACKBONE else [None]:
        declared = sorted(render(p, params, backbone) for p in entries(body["deps"]) if not p.startswith("pipeline/"))
        expected = sorted(str(p) for p in layout.stage_inputs(cfg, stage, backbone))
        assert declared == expected, f"dvc.yaml's {stage} data deps differ from layout.stage_inputs"


def test_dvc_data_deps_are_outputs_of_earlier_stages():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    cfg = load_config(ROOT / "params.yaml")
    produced = [str(p) for stage in STAGES for backbone in (cfg.backbones if stage in PER_BACKBONE else [None])
                for p in layout.stage_outputs(cfg, stage, backbone)]
    for stage in STAGES:
        for backbone in (cfg.backbones if stage in PER_BACKBONE else [None]):
            for dep in entries(stage_body(stage)["deps"]):
                if dep.startswith("pipeline/"):
                    continue
                path = render(dep, params, backbone)
                # A file of an output folder, an output itself, or a folder of several outputs (preds/).
                assert any(path == out or path.startswith(out + "/") or out.startswith(path + "/")
                           for out in produced), (
                    f"{stage} depends on {path}, which no stage's layout outputs hold")


def test_the_top_level_plots_are_the_eda_figures_and_templates_exist():
    """The stages declare their own plots; the top level adds the EDA's figures folder only (never its Markdown
    report or JSON summary, which DVC cannot draw), and each custom template a plot names is in .dvc/plots."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    cfg = load_config(ROOT / "params.yaml")
    top_level = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    assert [render(p, params) for p in entries(top_level)] == [str(layout.eda_figures_dir(cfg))]
    templates = {props.get("template") for stage in STAGES for item in stage_body(stage).get("plots") or []
                 if isinstance(item, dict) for props in item.values() if props}
    assert "fold_curves" in templates
    for name in templates - {None}:
        assert (ROOT / ".dvc" / "plots" / f"{name}.json").is_file(), f"plot template {name} is not in .dvc/plots"


def test_the_check_fails_on_a_misspelt_out(monkeypatch):
    """The layout check is not vacuous: a file name spelt differently in layout fails it."""
    monkeypatch.setattr(layout, "ENSEMBLE_SCORES", "score.json")
    with pytest.raises(AssertionError, match="ensemble outs differ"):
        test_dvc_outs_are_the_layout_paths("ensemble")


# ---------------------------------------------------------------- a run's record belongs to its run

def test_the_record_is_top_level_only_for_the_tracked_run(monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert layout.metrics_dir(load_config(None)) == Path("metrics")  # the default work_dir: params.yaml's run
    side = load_config(None, ["paths.work_dir=work/side"])
    assert layout.metrics_dir(side) == Path("work/side/metrics")
    assert layout.leaderboard_file(side) == Path("work/side/submissions/leaderboard.csv")
    asked = load_config(None, ["paths.work_dir=work/side", "paths.record=top"])
    assert layout.submissions_dir(asked) == Path("submissions")
    assert layout.metrics_dir(load_config(None, ["paths.record=run"])) == Path("work/metrics")
    monkeypatch.setenv("DVC_ROOT", "/somewhere")  # a stage that dvc repro or dvc exp run started
    assert layout.metrics_dir(side) == Path("metrics")
    assert layout.metrics_dir(load_config(None, ["paths.work_dir=work/side", "paths.record=run"])) == Path(
        "work/side/metrics")


def test_a_side_run_writes_its_metrics_under_its_own_work_dir(tmp_path):
    """A stage run by hand with another work_dir (a preset, a benchmark) leaves the top-level record alone; the same
    stage run by DVC writes it."""
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "pipeline.features", "--config", str(ROOT / "configs" / "smoke.yaml"),
               "features.enabled=false", f"paths.work_dir={tmp_path / 'side'}"]
    env = {key: value for key, value in os.environ.items() if key != "DVC_ROOT"}
    env["PYTHONPATH"] = str(ROOT)
    subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True)
    assert (tmp_path / "side" / "metrics" / "features.json").is_file()
    assert not (tmp_path / "metrics").exists()
    subprocess.run(command, cwd=tmp_path, env={**env, "DVC_ROOT": str(tmp_path)}, check=True, capture_output=True)
    assert (tmp_path / "metrics" / "features.json").is_file()
