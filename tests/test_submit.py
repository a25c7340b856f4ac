"""The submit stage: validation as a pure function, and the stage on a tiny hand-made work dir."""

from __future__ import annotations

import json
import os
import re
import subprocess

import fake_kaggle
import numpy as np
import pandas as pd
import pytest
from conftest import make_config_backbones_only as make_config

from pipeline import layout, provenance, submit
from pipeline.artifacts import probability_table
from pipeline.errors import ConfigError, DataError, PipelineError

CLASSES = ["cat", "dog", "owl"]
IDS = ["007", "010", "011", "012", "020", "021"]
# Ensemble test probabilities; argmax: cat, dog, owl, cat, dog, dog.
PROBA = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5],
                  [0.6, 0.3, 0.1], [0.3, 0.4, 0.3], [0.1, 0.5, 0.4]])
PREDICTED = ["cat", "dog", "owl", "cat", "dog", "dog"]
# Public rows 007, 010, 011: truth cat, dog, cat -> 2 of 3 right; Private rows 012, 020, 021:
# truth cat, owl, owl -> 1 of 3 right.
SOLUTION = pd.DataFrame({"image_id": IDS, "animal": ["cat", "dog", "cat", "cat", "owl", "owl"],
                         "Usage": ["Public"] * 3 + ["Private"] * 3})


def label_sample() -> pd.DataFrame:
    return pd.DataFrame({"image_id": IDS, "animal": "cat", "note": ["keep", "", "as is", "x", "y", "z"]})


def build_work(tmp_path, *overrides, classes=CLASSES, sample=None, proba=PROBA):
    """cache meta + sample + solution, and ensemble outputs (test rows shuffled): what submit reads."""
    cfg = make_config(tmp_path / "work", "backbones=[good,noisy]", *overrides)
    cache = cfg.path("cache")
    cache.mkdir(parents=True)
    (cache / "meta.json").write_text(json.dumps({
        "size_hw": list(cfg.data.size_hw), "channels": cfg.data.channels, "class_names": classes,
        "id_col": "image_id", "target_col": "animal", "mean": [0.5], "std": [0.2]}))
    (label_sample() if sample is None else sample).to_csv(cache / "sample_submission.csv", index=False)
    solution = SOLUTION.replace(dict(zip(CLASSES, classes)))
    solution.to_csv(cache / "solution.csv", index=False)
    out = cfg.path("ensemble")
    out.mkdir(parents=True)
    order = [3, 0, 5, 1, 4, 2]
    probability_table(np.array(IDS)[order], proba[order], classes).to_parquet(out / "test.parquet", index=False)
    scores = layout.ensemble_scores_file(cfg)
    scores.parent.mkdir(parents=True, exist_ok=True)
    scores.write_text(json.dumps({"ensemble_cv": 0.87654, "oof_score": 0.9}))
    (out / "weights.json").write_text(json.dumps({"members": ["good", "noisy"], "method": "weighted",
                                                  "metric": cfg.metric}))
    return cfg


def read_text(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


# ---------------------------------------------------------------- validate_submission

def _missing(frame):
    return frame[frame["image_id"] != "010"]


def _duplicate(frame):
    return frame.assign(image_id=["007", "010", "010", "012", "020", "021"])


def _nan(frame):
    return frame.assign(animal=["cat", "dog", np.nan, "cat", "dog", "dog"])


def _unknown(frame):
    return frame.assign(animal=["cat", "dog", "owl", "horse", "dog", "dog"])


def _extra(frame):
    return frame.assign(image_id=["007", "010", "011", "012", "020", "999"])


def _reordered(frame):
    return frame.iloc[[1, 0, 2, 3, 4, 5]]


def _dropped_column(frame):
    return frame.drop(columns="note")


@pytest.mark.parametrize("damage, expected", [
    (_missing, ["missing 1 id(s) [010]"]),
    (_duplicate, ["duplicate 1 id(s) [010]", "missing 1 id(s) [011]"]),
    (_nan, ["empty (NaN) prediction for 1 id(s) [011]"]),
    (_unknown, ["label(s) ['horse']", "1 id(s) [012]"]),
    (_extra, ["1 id(s) [999] not in the sample", "missing 1 id(s) [021]"]),
    (_reordered, ["not in the sample submission's order: row 0 holds 010"]),
    (_dropped_column, ["columns ['image_id', 'animal'] are not the sample submission's"]),
])
def test_validate_submission_names_the_offending_ids(damage, expected):
    sample = label_sample()
    good = sample.assign(animal=PREDICTED)
    assert submit.validate_submission(good, sample, CLASSES, "label") == []
    problems = "\n".join(submit.validate_submission(damage(good), sample, CLASSES, "label"))
    for text in expected:
        assert text in problems


def test_validate_submission_counts_many_ids_and_checks_probabilities():
    sample = pd.DataFrame({"id": [f"{i}" for i in range(25)], "a": "0", "b": "0"})
    problems = submit.validate_submission(sample.iloc[:3], sample, ["a", "b"], "proba")
    assert problems == ["missing 22 id(s) [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, ...] of the sample submission"]
    bad = sample.assign(a=[1.5] + [0.5] * 24, b=0.5)
    assert submit.validate_submission(bad, sample, ["a", "b"], "proba") == [
        "probabilities that are not numbers in [0, 1] for 1 id(s) [0]"]


# ---------------------------------------------------------------- the stage

@pytest.mark.parametrize("metric, public, private", [
    ("accuracy", 2 / 3, 1 / 3),
    # Public: cat F1 2/3 (1 TP, 1 FN), dog 1, owl 0 (1 FP) -> 5/9. Private: cat 1, dog 0, owl 0 -> 1/3.
    ("macro_f1", 5 / 9, 1 / 3),
])
def test_submit_writes_the_sample_shape_and_scores_like_kaggle(tmp_path, metric, public, private):
    cfg = build_work(tmp_path, f"metric={metric}")
    result = submit.main(cfg)
    folder = cfg.path("submissions")
    written = read_text(folder / "submission.csv")
    sample = label_sample()
    assert list(written.columns) == list(sample.columns)
    assert written["image_id"].tolist() == IDS  # the sample's text and order, leading zeros kept
    assert written["animal"].tolist() == PREDICTED
    assert written["note"].tolist() == sample["note"].tolist()  # other columns untouched
    assert re.fullmatch(r"\d{8}-\d{6}_weighted_cv0\.8765\.csv", os.path.basename(result["file"]))
    assert read_text(result["file"]).equals(written)

    board = pd.read_csv(folder / "leaderboard.csv")
    assert list(board.columns) == ["time", "file", "method", "members", "metric", "cv", "public", "private",
                                   "commit", "experiment", "config"]
    assert board.loc[0, ["method", "members", "metric"]].tolist() == ["weighted", "good+noisy", metric]
    assert board.loc[0, ["cv", "public", "private"]].tolist() == pytest.approx([0.87654, public, private])
    # A DVC metrics file: flat numbers only (method and metric are in the leaderboard row).
    assert json.loads((cfg.path("metrics") / "submission.json").read_text()) == pytest.approx(
        {"cv": 0.87654, "public": public, "private": private})

    second = submit.main(cfg)
    board = pd.read_csv(folder / "leaderboard.csv")
    assert len(board) == 2 and board["file"].tolist() == [os.path.basename(result["file"]),
                                                          os.path.basename(second["file"])]
    assert second["file"] != result["file"]  # the first submission is kept even within the same second


def test_labels_are_the_competitions_own_class_names(tmp_path):
    # Integer-like labels whose index differs from their text: index 0 is class "1".
    cfg = build_work(tmp_path, "metric=accuracy", classes=["1", "2", "3"])
    submit.main(cfg)
    assert read_text(cfg.path("submissions") / "submission.csv")["animal"].tolist() == ["1", "2", "3", "1", "2", "2"]


def test_proba_kind_writes_each_class_probability(tmp_path):
    sample = pd.DataFrame({"image_id": IDS, "cat": 0, "dog": 0, "owl": 0})
    cfg = build_work(tmp_path, "submit.kind=proba", "metric=accuracy", sample=sample)
    result = submit.main(cfg)
    written = pd.read_csv(cfg.path("submissions") / "submission.csv", dtype={"image_id": str})
    assert list(written.columns) == ["image_id", *CLASSES] and written["image_id"].tolist() == IDS
    np.testing.assert_allclose(written[CLASSES].to_numpy(), PROBA)  # aligned by id, not file order
    assert (result["public"], result["private"]) == pytest.approx((2 / 3, 1 / 3))


def test_proba_kind_with_a_label_sample_explains(tmp_path):
    cfg = build_work(tmp_path, "submit.kind=proba")
    with pytest.raises(ConfigError, match=r"no column for class\(es\) \['cat', 'dog', 'owl'\].*submit.kind=label"):
        submit.main(cfg)


def test_invalid_submission_writes_nothing(tmp_path):
    proba = PROBA.copy()
    proba[4] = np.nan
    cfg = build_work(tmp_path, proba=proba)
    with pytest.raises(DataError, match=r"empty \(NaN\) prediction for 1 id\(s\) \[020\]"):
        submit.main(cfg)
    assert not cfg.path("submissions").exists()


def test_upload_without_kaggle_fails_after_writing_the_local_file(tmp_path, monkeypatch):
    fake_kaggle.install(tmp_path, monkeypatch)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no kaggle at all
    cfg = build_work(tmp_path, "submit.upload=true", "submit.competition=some-comp")
    with pytest.raises(PipelineError) as error:
        submit.main(cfg)
    message = str(error.value)
    # What to install and the three ways to log in, in one message.
    for text in ("kaggle command is not on PATH", "pip install kaggle", "kaggle auth login", "KAGGLE_API_TOKEN",
                 "~/.kaggle/access_token", "kaggle.json", "KAGGLE_USERNAME and KAGGLE_KEY"):
        assert text in message
    kept = [p for p in cfg.path("submissions").glob("*_weighted_cv*.csv")]
    assert len(kept) == 1 and str(kept[0]) in message
    assert (cfg.path("submissions") / "submission.csv").exists()
    assert len(pd.read_csv(cfg.path("submissions") / "leaderboard.csv")) == 1


def test_upload_without_a_competition_names_the_key(tmp_path, monkeypatch):
    fake_kaggle.install(tmp_path, monkeypatch)
    cfg = build_work(tmp_path, "submit.upload=true")
    with pytest.raises(ConfigError, match="submit.competition is not set"):
        submit.main(cfg)


def test_upload_calls_the_kaggle_cli_and_reads_the_scores_back(tmp_path, monkeypatch):
    scores = tmp_path / "kaggle-submissions.csv"
    calls = fake_kaggle.install(tmp_path, monkeypatch, FAKE_KAGGLE_SUBMISSIONS=str(scores), DVC_EXP_NAME="lusty-oars")
    # No credential of any kind is set here: there is no pre-check, the CLI (the fake) decides.
    cfg = build_work(tmp_path, "submit.upload=true", "submit.competition=some-comp", "submit.message=first try")
    scores.write_text("fileName,date,description,status,publicScore,privateScore\n"
                      "other.csv,2026-01-01,x,complete,0.5,0.4\n")
    result = submit.main(cfg)
    row = read_text(cfg.path("submissions") / "leaderboard.csv").iloc[-1]
    message = (f"first try | weighted cv 0.8765 | commit {row['commit'] or 'none'} | exp lusty-oars | "
               f"config {row['config']}")
    assert fake_kaggle.calls(calls) == [
        ["competitions", "submit", "-c", "some-comp", "-f", result["file"], "-m", message],
        ["competitions", "submissions", "-c", "some-comp", "-v"]]
    assert row["lb_public"] == ""  # Kaggle has not scored this file (yet)


@pytest.mark.parametrize("commit, experiment, expected", [
    ("a1b2c3d+dirty", "lusty-oars", "first try | weighted cv 0.8765 | commit a1b2c3d+dirty | exp lusty-oars | "
                                    "config 0123456789ab"),
    ("", "", "first try | weighted cv 0.8765 | commit none | config 0123456789ab"),  # no git, no DVC experiment
])
def test_the_upload_message_carries_the_provenance(commit, experiment, expected):
    row = {"method": "weighted", "cv": 0.87654, "commit": commit, "experiment": experiment, "config": "0123456789ab"}
    assert submit.upload_message("first try", row) == expected


# ---------------------------------------------------------------- the top-level record and where it came from

def git(repo, *args) -> str:
    command = ["git", "-c", "user.email=t@t", "-c", "user.name=t", "-c", "commit.gpgsign=false", *args]
    return subprocess.run(command, cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def test_the_record_is_top_level_kept_and_traced_to_commit_experiment_and_config(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "code.py").write_text("print('v1')\n")
    (repo / "dvc.lock").write_text("schema: '2.0'\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "v1")
    monkeypatch.chdir(repo)
    monkeypatch.setenv("DVC_EXP_NAME", "lusty-oars")
    # The repository's own top-level folders, relative to the current folder (where DVC runs stages): the record
    # of the run DVC tracks, asked for here with paths.record=top (the work folder is elsewhere).
    cfg = build_work(tmp_path, "paths.submissions=submissions", "paths.metrics=metrics", "paths.record=top")
    first = submit.main(cfg)
    assert os.path.dirname(first["file"]) == "submissions" and (repo / first["file"]).exists()
    assert (repo / "metrics" / "submission.json").exists() and not (tmp_path / "work" / "submissions").exists()
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "the record")  # from now on git tracks the leaderboard and metrics a run rewrites
    recorded = git(repo, "rev-parse", "--short", "HEAD")
    # What a dvc repro rewrites before submit runs (the ensemble's metrics, dvc.lock) is the record, not a change.
    scores = layout.ensemble_scores_file(cfg)
    scores.write_text(scores.read_text().replace("0.87654", "0.88"))
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    second = submit.main(cfg)  # still clean
    (repo / "code.py").write_text("print('v2')\n")
    third = submit.main(cfg)

    board = read_text(repo / "submissions" / "leaderboard.csv")
    first_commit = board.loc[0, "commit"]
    assert re.fullmatch(r"[0-9a-f]{7,}", first_commit) and first_commit != recorded
    assert board["commit"].tolist() == [first_commit, recorded, recorded + "+dirty"]
    assert board["experiment"].tolist() == ["lusty-oars"] * 3
    assert board["config"].tolist() == [provenance.config_digest(cfg)] * 3
    kept = [first["file"], second["file"], third["file"]]
    assert len(set(kept)) == 3 and all((repo / name).exists() for name in kept)  # no run deletes a kept file
    assert board["file"].tolist() == [os.path.basename(name) for name in kept]


def test_outside_git_the_commit_is_empty(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above tmp_path either
    cfg = build_work(tmp_path)
    submit.main(cfg)
    board = read_text(cfg.path("submissions") / "leaderboard.csv")
    assert board.loc[0, ["commit", "experiment"]].tolist() == ["", ""] and len(board.loc[0, "config"]) == 12


def test_the_config_digest_follows_the_settings_not_the_folders(tmp_path):
    digest = provenance.config_digest(make_config(tmp_path / "a"))
    assert re.fullmatch(r"[0-9a-f]{12}", digest)
    assert provenance.config_digest(make_config(tmp_path / "b")) == digest  # paths move outputs, change no result
    assert provenance.config_digest(make_config(tmp_path / "a", "train.lr=0.001")) != digest
