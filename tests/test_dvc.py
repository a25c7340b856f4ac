"""`dvc repro` end to end on a copy of the repository with the smoke preset as params.yaml."""

import json
import subprocess

import pandas as pd
import pytest
import yaml

from repo_copy import copy_repository, dvc_env, stages_run

pytestmark = pytest.mark.slow


def run(args, cwd):
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=dvc_env(cwd))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return copy_repository(tmp_path_factory.mktemp("dvc") / "repo")


def test_dvc_repro_runs_every_stage_then_nothing_then_one_backbone(repo):
    first = run(["dvc", "repro"], repo)
    backbones = ["lcnet_050", "mobilenetv3_small_050"]
    expected = {"prepare", "eda", "folds", "ensemble", "submit"} | {
        f"{stage}@{name}" for stage in ("tune", "train", "infer") for name in backbones}
    assert stages_run(first) == expected

    work = repo / "work"
    sample = pd.read_csv(work / "competition" / "sample_submission.csv")
    submission = pd.read_csv(work / "submissions" / "submission.csv")
    assert list(submission.columns) == list(sample.columns) and submission["id"].tolist() == sample["id"].tolist()
    board = pd.read_csv(work / "submissions" / "leaderboard.csv")
    assert len(board) == 1 and board[["cv", "public", "private"]].notna().all(axis=None)
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], repo))
    assert metrics  # every backbone's CV, the ensemble's OOF score and the leaderboard scores
    for name in backbones:
        assert json.loads((work / "metrics" / f"{name}.json").read_text())["backbone"] == name

    assert stages_run(run(["dvc", "repro"], repo)) == set()  # nothing changed: nothing runs

    params = yaml.safe_load((repo / "params.yaml").read_text())
    # A key the search does not tune, so the change reaches the trained models whatever tune finds.
    params["backbones"]["lcnet_050"] = {"epochs": 2}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = stages_run(run(["dvc", "repro"], repo))
    changed = {"tune@lcnet_050", "train@lcnet_050", "infer@lcnet_050", "ensemble"}
    # submit follows only when the ensemble's outputs changed (one smoke epoch may predict the same).
    assert changed <= third <= changed | {"submit"}
    rows = len(pd.read_csv(work / "submissions" / "leaderboard.csv"))
    assert rows == (2 if "submit" in third else 1)  # earlier submissions are kept (persist)
