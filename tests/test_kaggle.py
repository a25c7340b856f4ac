"""The kaggle CLI wrapper against a fake ``kaggle`` on PATH: download, login failures, tokens kept out, scores
read back."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import fake_kaggle
import pandas as pd
import pytest
from conftest import ROOT, make_config, make_csv_competition

from pipeline import kaggle, layout, prepare
from pipeline.errors import ConfigError, DataError, PipelineError

TOKEN = "KGAT_0123456789abcdefSECRET"


def kaggle_source(tmp_path, *overrides):
    return make_config(tmp_path / "work", "data.source=kaggle", "data.competition=tiny-comp", "data.channels=1",
                       "embed.enabled=false", *overrides)


def test_a_kaggle_competition_is_downloaded_once_and_read_as_a_folder(tmp_path, monkeypatch):
    calls = fake_kaggle.install(tmp_path, monkeypatch,
                                FAKE_KAGGLE_COMPETITION=str(make_csv_competition(tmp_path / "source")))
    cfg = kaggle_source(tmp_path)
    stats = prepare.main(cfg)
    assert (stats["train_images"], stats["test_images"]) == (40, 12)
    folder = layout.kaggle_competition_dir(cfg)
    assert folder == tmp_path / "work" / "competition" / "tiny-comp" and (folder / "train.csv").is_file()
    assert fake_kaggle.calls(calls)[0][:4] == ["competitions", "download", "-c", "tiny-comp"]
    prepare.main(cfg)  # the second run reads the folder it has: no second download
    assert len(fake_kaggle.calls(calls)) == 1


def test_a_kaggle_source_needs_its_competition():
    with pytest.raises(ConfigError, match="data.competition is required"):
        make_config(Path("work"), "data.source=kaggle")


def test_the_competitions_own_names_are_inferred_and_what_is_not_is_named(tmp_path, monkeypatch):
    source = make_csv_competition(tmp_path / "source")
    (source / "train.csv").rename(source / "train_labels.csv")
    (source / "sample_submission.csv").rename(source / "sampleSubmission.csv")
    (source / "train").rename(source / "train_images")
    (source / "test").rename(source / "test_images")
    fake_kaggle.install(tmp_path, monkeypatch, FAKE_KAGGLE_COMPETITION=str(source))
    assert prepare.main(kaggle_source(tmp_path))["train_images"] == 40
    found = kaggle.find_competition_files(tmp_path / "work" / "competition" / "tiny-comp",
                                          ["train_csv", "sample_submission", "train_images", "test_images"])
    assert found == {"train_csv": "train_labels.csv", "sample_submission": "sampleSubmission.csv",
                     "train_images": "train_images", "test_images": "test_images"}

    shutil.copytree(source / "test_images", source / "test_extra")  # two test folders: which one?
    with pytest.raises(DataError, match=r"the test images' folder \(data.test_images\): several of"):
        prepare.main(kaggle_source(tmp_path, "paths.competition=" + str(tmp_path / "second")))


def auth_failure(tmp_path, monkeypatch):
    fake_kaggle.install(tmp_path, monkeypatch, FAKE_KAGGLE_AUTH_FAIL="1", KAGGLE_API_TOKEN=TOKEN,
                        FAKE_KAGGLE_COMPETITION=str(tmp_path))


def test_a_failed_login_is_one_message_with_the_ways_to_log_in_and_no_token(tmp_path, monkeypatch):
    auth_failure(tmp_path, monkeypatch)
    with pytest.raises(PipelineError) as error:
        prepare.main(kaggle_source(tmp_path))
    message = str(error.value)
    for text in ("could not log in", "pip install kaggle", "kaggle auth login", "KAGGLE_API_TOKEN", "access_token",
                 "kaggle.json"):
        assert text in message
    assert TOKEN not in message and "[redacted]" in message


@pytest.mark.parametrize("where", ["env", "access_token", "access_token.txt", "kaggle.json"])
def test_every_token_the_cli_could_hold_is_redacted(tmp_path, monkeypatch, where):
    fake_kaggle.install(tmp_path, monkeypatch)
    secret = "abc-not-token-shaped-9f"  # no KGAT_ prefix, not 32 hex: only knowing where tokens live finds it
    home = tmp_path / "home" / ".kaggle"
    home.mkdir(parents=True)
    if where == "env":
        monkeypatch.setenv("KAGGLE_API_TOKEN", secret)
    elif where == "kaggle.json":
        (home / "kaggle.json").write_text(f'{{"username": "someone", "key": "{secret}"}}')
    else:
        (home / where).write_text(secret + "\n")
    assert kaggle.redact(f"token {secret} and {TOKEN} and {'ab' * 16}") == \
        "token [redacted] and [redacted] and [redacted]"


def test_the_cli_exits_2_with_the_message_and_no_traceback(tmp_path, monkeypatch):
    auth_failure(tmp_path, monkeypatch)
    work = tmp_path / "work"
    result = subprocess.run([sys.executable, "-m", "pipeline.prepare", "--config", str(ROOT / "configs/smoke.yaml"),
                             f"paths.work_dir={work}", "data.source=kaggle", "data.competition=tiny-comp"],
                            capture_output=True, text=True, cwd=tmp_path, env=os.environ.copy())
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "kaggle auth login" in result.stderr and TOKEN not in result.stderr
    logs = list((work / "logs").glob("prepare-*.log"))
    assert logs and all(TOKEN not in log.read_text() for log in logs)


def test_kaggles_scores_land_in_the_matching_rows_and_the_plot(tmp_path, monkeypatch):
    scores = tmp_path / "kaggle.csv"
    scores.write_text("fileName,date,description,status,publicScore,privateScore\n"
                      "b.csv,2026-01-02,second,complete,0.71,\n"
                      "a.csv,2026-01-01,first,complete,0.62,0.60\n"
                      "b.csv,2026-01-01,older upload of b,complete,0.10,\n"
                      "elsewhere.csv,2026-01-01,not ours,complete,0.99,\n"
                      f"c.csv,2026-01-03,third,error {TOKEN},,\n")  # whatever Kaggle prints may hold a token
    fake_kaggle.install(tmp_path, monkeypatch, FAKE_KAGGLE_SUBMISSIONS=str(scores), KAGGLE_API_TOKEN=TOKEN)
    cfg = make_config(tmp_path / "work", "submit.competition=some-comp")
    board = pd.DataFrame({"time": ["t1", "t2", "t3"], "file": ["a.csv", "b.csv", "c.csv"],
                          "cv": ["0.65", "0.70", "0.8"], "public": ["", "", "0.75"]})
    path = layout.leaderboard_file(cfg)
    path.parent.mkdir(parents=True)
    board.to_csv(path, index=False)
    assert kaggle.main(cfg) == {"matched": 3, "rows": 3}
    written = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert written["lb_public"].tolist() == ["0.62", "0.71", ""]  # b.csv: its newest row; c.csv: not scored
    assert written["lb_private"].tolist() == ["0.6", "", ""]
    assert written["lb_status"].tolist() == ["complete", "complete", "error [redacted]"]
    assert TOKEN not in path.read_text()
    table = pd.read_csv(layout.cv_lb_table(cfg))
    assert table[["cv", "lb_public", "local_public"]].fillna(-1).values.tolist() == [
        [0.65, 0.62, -1], [0.70, 0.71, -1], [0.8, -1, 0.75]]
    assert layout.cv_lb_figure(cfg).stat().st_size > 1000
