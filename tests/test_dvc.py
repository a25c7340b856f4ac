"""`dvc repro` end to end on a copy of the repository with the smoke preset as params.yaml."""

import json
import shlex
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
    expected = {"prepare", "eda", "folds", "features", "embed", "ensemble", "submit"} | {
        f"{stage}@{name}" for stage in ("tune", "train", "infer") for name in backbones}
    assert stages_run(first) == expected

    work = repo / "work"
    sample = pd.read_csv(work / "competition" / "sample_submission.csv")
    submission = pd.read_csv(repo / "submissions" / "submission.csv")  # the top-level record, beside work/
    assert list(submission.columns) == list(sample.columns) and submission["id"].tolist() == sample["id"].tolist()
    board = pd.read_csv(repo / "submissions" / "leaderboard.csv", dtype={"commit": str, "config": str})
    assert len(board) == 1 and board[["cv", "public", "private"]].notna().all(axis=None)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True).stdout
    # Clean: what the run rewrote (dvc.lock, metrics/, submissions/) is the pipeline's record, not a change.
    assert board.loc[0, "commit"] == head.strip() and len(board.loc[0, "config"]) == 12
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], repo))
    assert metrics  # every backbone's CV, the ensemble's OOF score and the leaderboard scores
    for name in backbones:
        record = json.loads((repo / "metrics" / f"{name}.json").read_text())  # flat numbers, for dvc exp show
        assert {f"{name}_{key}" for key in ("cv", "cv_std", "oof_accuracy", "fold0_macro_f1", "fold1_best_epoch")
                } <= set(record)
        assert all(isinstance(value, float) for value in record.values())

    # Nothing changed: prepare looks (it always does, in about a second) and nothing else runs.
    assert stages_run(run(["dvc", "repro"], repo)) == {"prepare"}

    params = yaml.safe_load((repo / "params.yaml").read_text())
    # A searched key: its new value opens a fresh study whose untuned trial uses it (no stale study reused).
    params["backbones"]["lcnet_050"] = {"lr": 0.004}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = stages_run(run(["dvc", "repro"], repo)) - {"prepare"}  # prepare always looks; it found no change
    changed = {"tune@lcnet_050", "train@lcnet_050", "infer@lcnet_050", "ensemble"}
    # submit follows only when the ensemble's outputs changed (one smoke epoch may predict the same).
    assert changed <= third <= changed | {"submit"}
    board = pd.read_csv(repo / "submissions" / "leaderboard.csv", dtype={"commit": str})
    assert len(board) == (2 if "submit" in third else 1)  # earlier submissions are kept (persist)
    if "submit" in third:  # params.yaml now differs from the commit
        assert board["commit"].tolist() == [board.loc[0, "commit"], board.loc[0, "commit"] + "+dirty"]
    trials = pd.read_csv(work / "tuning" / "lcnet_050" / "trials.csv")
    assert len(trials) == 1 and trials["params_lr"].iloc[0] == 0.004  # the new study's untuned trial only


# The README's lines for a team of machines, run as written (tests/test_readme_scale.py holds the README to them):
# REMOTE is the team's DVC remote (S3 in the README, a local folder here), REPO the repository's git URL.
TEAM_COMMANDS = ["dvc remote add -d team REMOTE",
                 'dvc repro && git add -A && git commit -m "run" && dvc push',
                 "git clone REPO && cd REPO && dvc pull && dvc repro"]


def run_line(line: str, cwd) -> list[str]:
    """A README line of commands joined by ``&&``, each run by :func:`run` (``cd`` moves to a folder): the outputs."""
    outputs = []
    for command in line.split(" && "):
        if command.startswith("cd "):
            cwd = cwd / command[3:]
        else:
            outputs.append(run(shlex.split(command), cwd))
    return outputs


def test_a_fresh_clone_pulls_from_a_dvc_remote_and_retrains_nothing(repo, tmp_path):
    """Machine A runs, commits the lock file and pushes to the team's remote; a fresh clone B pulls, and its
    `dvc repro` finds every stage up to date: no fold, study or prediction is computed again."""
    remote, machine_a, machine_b = TEAM_COMMANDS
    run(["git", "config", "user.email", "a@team"], repo)
    run(["git", "config", "user.name", "A"], repo)
    run_line(remote.replace("REMOTE", str(tmp_path / "remote")), repo)
    run_line(machine_a, repo)  # its dvc repro brings A up to date whatever the tests before changed
    # git clone /path/to/repo makes ./repo: the line's first REPO is the URL, the second the folder.
    _, pull, output = run_line(machine_b.replace("REPO", str(repo), 1).replace("REPO", repo.name), tmp_path)
    b = tmp_path / repo.name
    assert "fetched" in pull and (b / "work" / "models").is_dir()
    assert stages_run(output) == {"prepare"}, output[-3000:]  # prepare always looks ...
    assert "is up to date" in output  # ... and finds the pulled cache built from the same images
    assert "epoch 1/" not in output and "already trained" not in output
    for record in ("submissions/submission.csv", "dvc.lock"):
        assert (b / record).read_text() == (repo / record).read_text()


def test_fewer_folds_leave_no_stale_fold_behind(repo):
    def set_splits(count):
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["folds"]["n_splits"] = count
        # One backbone, no search: what this test is about (the folds) costs half the time.
        params["backbones"], params["tune"]["enabled"] = {"lcnet_050": params["backbones"]["lcnet_050"]}, False
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    set_splits(3)
    run(["dvc", "repro"], repo)
    models = repo / "work" / "models" / "lcnet_050"
    assert sorted(p.name for p in models.glob("fold*")) == ["fold0", "fold1", "fold2"]
    set_splits(2)
    run(["python", "-m", "pipeline.folds"], repo)
    # infer alone refuses the model of a fold that no longer exists, with a message, not a traceback.
    refused = subprocess.run(["python", "-m", "pipeline.infer", "--backbone", "lcnet_050"], cwd=repo,
                             capture_output=True, text=True, env=dvc_env(repo))
    assert refused.returncode == 2 and "fold(s) [2]" in refused.stderr and "Traceback" not in refused.stderr
    output = run(["dvc", "repro"], repo)
    assert "removed" in output and sorted(p.name for p in models.glob("fold*")) == ["fold0", "fold1"]
    oof = pd.read_parquet(repo / "work" / "preds" / "lcnet_050_oof.parquet")
    assert sorted(oof["fold"].unique()) == [0, 1]


def edit(path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path} no longer holds {old!r}: pick another line to edit"
    path.write_text(text.replace(old, new, 1))


def test_a_comment_or_docstring_edit_retrains_nothing(repo):
    """A fixed typo in the training code or in the competition reader: DVC re-runs the stages that list the file,
    and each finds every fold already trained (the fold key digests the parsed code, not the text)."""
    run(["dvc", "repro"], repo)  # up to date whatever ran before
    losses, competition = repo / "pipeline" / "training" / "losses.py", repo / "pipeline" / "data" / "competition.py"
    edit(losses, '"""', '"""A docstring edited: a typo fixed.\n\n', )
    edit(losses, "\ndef ", "\n# a comment added above the first function\ndef ")
    edit(competition, '"""', '"""The mask-layout reader\'s docstring, its typo fixed. ')
    output = run(["dvc", "repro"], repo)
    backbones = yaml.safe_load((repo / "params.yaml").read_text())["backbones"]  # the fewer-folds test left one
    assert {f"train@{name}" for name in backbones} <= stages_run(output)  # DVC saw the files change
    assert output.count("already trained") >= len(backbones) and "epoch 1/" not in output  # no fold trained


def test_an_edit_to_the_loss_code_retrains_every_fold(repo):
    run(["dvc", "repro"], repo)  # up to date whatever ran before
    losses = repo / "pipeline" / "training" / "losses.py"
    losses.write_text(losses.read_text() + "\nLOSS_EDIT = 1  # an edit to what runs: the loss may differ now\n")
    output = run(["dvc", "repro"], repo)
    ran = stages_run(output)
    backbones = yaml.safe_load((repo / "params.yaml").read_text())["backbones"]
    assert {f"{stage}@{name}" for stage in ("tune", "train", "infer") for name in backbones} <= ran
    assert not ran & {"eda", "folds"}  # they do not import the training code
    assert "is up to date" in output  # prepare looked (it always does) and left the cache alone
    # The models folder persists across runs, but no fold may be skipped as trained by the old code.
    assert "already trained" not in output and "epoch 1/1" in output
