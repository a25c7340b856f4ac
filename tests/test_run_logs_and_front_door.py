"""Every stage run leaves a log of what it printed, and ``python -m pipeline STAGE`` is the one way in."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from conftest import ROOT
from test_submit import build_work
from tqdm import tqdm

from pipeline import cli, layout, submit
from pipeline.config import Config
from pipeline.layout import overrides_under

SMOKE = str(ROOT / "configs" / "smoke.yaml")
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def stage_args(tmp_path) -> list[str]:
    """The command line of the work dir that ``build_work`` makes (everything under tmp_path/work)."""
    return ["--config", SMOKE, *overrides_under(tmp_path / "work"), "backbones=[good,noisy]"]


def logs(tmp_path) -> list:
    return sorted((tmp_path / "work" / "logs").glob("*.log"))


# ---------------------------------------------------------------- the run log

def test_a_stage_run_writes_its_log_through_the_front_door(tmp_path):
    build_work(tmp_path)
    result = subprocess.run([sys.executable, "-m", "pipeline", "submit", *stage_args(tmp_path)],
                            capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    [log] = logs(tmp_path)
    assert log.name.startswith("submit-") and log.name[len("submit-"):-len(".log")].replace("-", "").isdigit()
    text = log.read_text()
    assert "submit: wrote" in result.stderr and "submit: wrote" in text and "leaderboard (last 5)" in text
    assert text.splitlines()[0].startswith("# ") and "paths.work_dir=" in text.splitlines()[0]  # the command
    assert "\r" not in text


def test_a_failing_stage_logs_its_error(tmp_path, capsys):
    cfg = build_work(tmp_path)
    (layout.ensemble_dir(cfg) / layout.ENSEMBLE_TEST).write_bytes(b"not parquet")
    with pytest.raises(SystemExit) as exit:
        cli.run(submit.main, "test", stage_args(tmp_path))
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "error: ensemble test predictions" in err and "cannot be read" in err  # the terminal still sees it
    [log] = logs(tmp_path)
    assert "error: ensemble test predictions" in log.read_text()
    assert sys.stderr is not None and not isinstance(sys.stderr, cli.Tee)  # the streams are given back


def test_an_unexpected_crash_logs_its_traceback(tmp_path):
    build_work(tmp_path)

    def main(cfg):
        print("about to fail")
        raise RuntimeError("a bug, not bad input")

    with pytest.raises(RuntimeError):
        cli.run(main, "test", stage_args(tmp_path))
    [log] = logs(tmp_path)
    text = log.read_text()
    assert "about to fail" in text and "Traceback" in text and "RuntimeError: a bug, not bad input" in text


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_reach_a_terminal_but_not_the_log():
    terminal, log = Terminal(), io.StringIO()
    stream = cli.Tee(terminal, log)
    for _ in tqdm(range(3), file=stream, disable=None, mininterval=0):
        print("epoch line", file=stream)
    assert "\r" in terminal.getvalue() and "epoch line" in terminal.getvalue()
    assert "\r" not in log.getvalue() and log.getvalue().count("epoch line\n") == 3
    piped, piped_log = io.StringIO(), io.StringIO()  # not a terminal: tqdm(disable=None) draws nothing at all
    for _ in tqdm(range(3), file=cli.Tee(piped, piped_log), disable=None, mininterval=0):
        pass
    assert piped.getvalue() == piped_log.getvalue() == ""


def test_a_log_that_cannot_be_written_does_not_stop_the_stage(tmp_path, capsys):
    build_work(tmp_path)
    (tmp_path / "work" / "logs").write_text("a file where the logs folder should be")
    result = cli.run(submit.main, "test", stage_args(tmp_path))
    assert result["method"] == "weighted"
    assert "note: no run log" in capsys.readouterr().err


# ---------------------------------------------------------------- the front door

def front_door(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=120)


def test_the_front_door_lists_the_stages():
    result = front_door("--help")
    assert result.returncode == 0
    for stage in layout.STAGES:
        assert f"\n  {stage} " in result.stdout, result.stdout
    wrong = front_door("trian")
    assert wrong.returncode == 2 and "no stage 'trian'" in wrong.stderr and "prepare, eda, folds" in wrong.stderr


def test_a_stage_help_names_what_it_reads_and_writes():
    result = front_door("train", "--help")
    assert result.returncode == 0, result.stderr
    cfg = Config()
    for path in (layout.folds_file(cfg), layout.cache_dir(cfg), layout.oof_file(cfg, "BACKBONE"),
                 layout.train_metrics_file(cfg, "BACKBONE")):
        assert str(path).replace("BACKBONE", "<backbone>") in result.stdout, result.stdout
    assert "stage train" in result.stdout and "the `train` section" in result.stdout
    assert "--backbone" in result.stdout
    assert "the `data` section" in front_door("prepare", "--help").stdout
