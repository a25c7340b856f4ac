"""The experiment loop on a copy of the repository (smoke settings): two `dvc exp run`s compare in `dvc exp show`,
`dvc exp diff`, `dvc metrics diff` and `dvc plots diff`; `dvc plots show` renders every declared plot without a
warning, each metric's curves of a backbone are one chart with the folds overlaid, and the confusion matrices,
Optuna's history, the ensemble's correlation and the EDA figures are there; nothing else (no Markdown, no JSON)."""

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from repo_copy import copy_repository, dvc_env

from pipeline import layout
from pipeline.config import load_config

pytestmark = pytest.mark.slow

METRICS = ("train_loss", "val_loss", "macro_f1", "lr")
EDA_FIGURES = ("class_balance.png", "sizes.png", "intensity.png", "samples.png", "adversarial.png")


def run(args, cwd, **env) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env={**dvc_env(cwd), **env})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


README = Path(__file__).resolve().parents[1] / "README.md"
# README commands that other tests run (the file that does), or that cannot run here (why).
ELSEWHERE = {
    "dvc repro": "test_dvc.py",
    "python -m pipeline.config --config configs/gpu.yaml --write params.yaml": "test_dvc_presets.py",
    "dvc exp run -S data.source=folder -S data.dir=/data/my-comp": "test_dvc_folder.py (via params)",
    "dvc exp run --queue -S folds.seed=7 && dvc queue start -j 1": "queue workers copy the repository: minutes more",
}


def readme_commands() -> list[str]:
    """The commands of the README's DVC section (its bash block), comments stripped."""
    section = README.read_text().split("## DVC and experiments", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [re.sub(r"\s+#\s.*$", "", line).strip() for line in block.splitlines() if line.strip()]


def readme_command(start: str) -> str:
    (command,) = [line for line in readme_commands() if line.startswith(start)]
    return command


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = copy_repository(tmp_path_factory.mktemp("experiments") / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    # One backbone, the default's (the README's lines name it): what is tested (the experiment commands, metrics and
    # plots) is per backbone; half the time. Without its own lr, so that the README's experiment (-S train.lr=0.01)
    # changes what it trains.
    params["backbones"] = {"tf_efficientnet_lite0": {"pretrained_file": "efficientnet_lite0"}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "one backbone"], repo)
    run(["dvc", "exp", "run", "-n", "base"], repo)
    return repo


def experiment_metrics(shown: list, name: str) -> dict:
    """``dvc exp show --json`` -> ``{file: {key: value}}`` of the experiment called ``name``."""
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            for rev in experiment["revs"]:
                if rev["name"] == name:
                    return {path: found["data"] for path, found in rev["data"]["metrics"].items()}
    raise AssertionError(f"no experiment {name} in dvc exp show")


def test_every_readme_dvc_command_is_run_by_a_test():
    here = ("dvc exp run -n", "dvc exp show", "dvc exp diff", "dvc plots show", "python -m pipeline train")
    assert [c for c in readme_commands() if not c.startswith(here) and c not in ELSEWHERE] == []


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
    data_plots = {str(layout.cv_lb_table(cfg))}  # the one table drawn as a chart: CV against the Public LB
    assert not [plot for plot in set(plots) - data_plots if plot.endswith((".md", ".json", ".yaml", ".csv"))]
    assert all(plots[plot][0]["type"] == "image" for plot in images)
    (chart,) = plots[str(layout.cv_lb_table(cfg))]
    assert chart["type"] == "vega" and chart["content"]["encoding"]["x"]["field"] == "cv"

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


# After the plots test: the README's lines change the workspace (another experiment, a train outside DVC).
def test_two_experiments_compare_in_every_dvc_command(repo):
    # The README's commands, as written: an experiment, the table, the diffs.
    run(["bash", "-c", readme_command("dvc exp run -n")], repo)
    shown = json.loads(run(["dvc", "exp", "show", "--no-pager", "--json"], repo))
    cfg = load_config(repo / "params.yaml")
    for name in ("base", "lr-1e-2"):
        files = experiment_metrics(shown, name)
        expected = {str(layout.train_metrics_file(cfg, b)) for b in cfg.backbones} | {
            str(layout.ensemble_scores_file(cfg)), str(layout.submission_metrics_file(cfg)),
            str(layout.features_metrics_file(cfg)), str(layout.embed_metrics_file(cfg))}
        assert set(files) == expected
        values = [value for data in files.values() for value in data.values()]
        assert values and all(isinstance(value, float) for value in values)  # flat numbers: no "!" in any column
        assert {"cv", "public", "private"} <= set(files[str(layout.submission_metrics_file(cfg))])
    assert experiment_metrics(shown, "base") != experiment_metrics(shown, "lr-1e-2")

    table = run(["bash", "-c", readme_command("dvc exp show") + " --no-pager"], repo, COLUMNS="300")
    header = table.splitlines()[1].split()  # a wide terminal: the table's own width shows
    assert header == ["Experiment", *(f"{b}_cv" for b in cfg.backbones), "features_cv", "embed_cv", "cv", "public",
                      "private", "train.lr"]
    assert "base" in table and "lr-1e-2" in table and max(len(line) for line in table.splitlines()) <= 120, table

    run(["dvc", "exp", "apply", "base"], repo)  # the workspace differs from the experiment the diffs name
    diffs = run(["bash", "-c", readme_command("dvc exp diff")], repo)
    assert "train.lr" in diffs and "cv" in diffs and "WARNING" not in diffs and "ERROR" not in diffs
    diff = json.loads(run(["dvc", "plots", "diff", "base", "lr-1e-2", "--json"], repo))
    assert "errors" not in diff, diff.get("errors")  # each experiment's plots come from DVC's cache

    alone = run(["bash", "-c", readme_command("python -m pipeline train")], repo)  # one stage, outside DVC
    assert "[tf_efficientnet_lite0] fold 1 epoch 3/3" in alone
