"""`dvc plots show` after a smoke `dvc repro`, on a copy of the repository: every declared plot renders without a
warning, each metric's curves of a backbone are one chart with the folds overlaid, and the confusion matrices,
Optuna's history, the ensemble's correlation and the EDA figures are there; nothing else (no Markdown, no JSON)."""

import json
import subprocess

import pytest
from repo_copy import copy_repository, dvc_env

from pipeline import layout
from pipeline.config import load_config

pytestmark = pytest.mark.slow

METRICS = ("train_loss", "val_loss", "macro_f1", "lr")
EDA_FIGURES = ("class_balance.png", "sizes.png", "intensity.png", "samples.png", "adversarial.png")


def run(args, cwd) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=dvc_env(cwd))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = copy_repository(tmp_path_factory.mktemp("plots") / "repo")
    run(["dvc", "repro"], repo)
    return repo


def test_dvc_plots_show_renders_every_plot_without_a_warning(repo):
    cfg = load_config(repo / "params.yaml")
    shown = json.loads(subprocess.run(["dvc", "plots", "show", "--json"], cwd=repo, capture_output=True, text=True,
                                      env=dvc_env(repo), check=True).stdout)
    assert "errors" not in shown, shown.get("errors")
    plots = shown["data"]

    curves = {str(layout.fold_curves_dir(cfg, name) / f"{metric}.tsv") for name in cfg.backbones for metric in METRICS}
    images = {str(path) for name in cfg.backbones for path in (
        layout.confusion_file(cfg, name), layout.tuning_plots_dir(cfg, name) / "history.png")}
    images |= {str(layout.ensemble_dir(cfg) / layout.ENSEMBLE_CORRELATION)}
    images |= {str(layout.eda_figures_dir(cfg) / name) for name in EDA_FIGURES}
    assert curves | images <= set(plots)
    assert not [plot for plot in plots if plot.endswith((".md", ".json", ".yaml", ".csv"))]
    assert all(plots[plot][0]["type"] == "image" for plot in images)

    folds = cfg.folds.n_splits
    assert not [plot for plot in plots if "/fold" in plot]  # no chart of a single fold
    for plot in curves:
        (chart,) = plots[plot]
        spec = chart["content"]
        assert chart["type"] == "vega" and spec["encoding"]["color"]["field"] == "fold"
        points = spec["data"]["values"]
        assert {point["fold"] for point in points} == {str(fold) for fold in range(folds)}  # overlaid in one chart
        assert len(points) == folds * cfg.train.epochs and spec["encoding"]["x"]["field"] == "epoch"

    output = run(["dvc", "plots", "show"], repo)
    assert "WARNING" not in output and "ERROR" not in output and "failed" not in output, output
    assert (repo / "dvc_plots" / "index.html").is_file()
