"""train.devices: the jobs of a stage spread over devices, one worker process each (pipeline.training.devices).

On the CPU, `train.devices=[cpu, cpu]` runs two folds at once: train, infer and tune write what a run on one device
writes, the workers really run at the same time, and a worker that dies stops the stage with a message while every
job finished before it stays finished; a killed stage takes its workers with it."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, make_config

from pipeline import folds, infer, prepare, train, tune
from pipeline.errors import ConfigError, PipelineError
from pipeline.training.devices import resolve_devices, run_on_devices, threads_for

TWO_CPUS = "train.devices=[cpu, cpu]"


def meet(device: str, folder: str, me: str, other: str) -> tuple[str, int]:
    """A job that finishes only when the other job has started too: two of them can only both finish at once."""
    Path(folder, me).touch()
    deadline = time.monotonic() + 120
    while not Path(folder, other).exists():
        if time.monotonic() > deadline:
            raise PipelineError(f"job {me} waited 120 s for job {other}: the jobs did not run at the same time")
        time.sleep(0.05)
    return device, os.getpid()


def finish_or_die(device: str, folder: str, name: str) -> str:
    """Job 'ok' writes its file and returns; job 'die' kills its worker process after job 'ok' finished."""
    if name == "die":
        while not Path(folder, "ok").exists():
            time.sleep(0.05)
        os._exit(1)
    Path(folder, name).write_text(device)
    return name


def test_two_cpu_workers_run_their_jobs_at_the_same_time_each_on_its_device(tmp_path):
    results = run_on_devices(meet, [(str(tmp_path), "a", "b"), (str(tmp_path), "b", "a")], ["cpu", "cpu"], "test")
    assert [device for device, _ in results] == ["cpu", "cpu"]
    assert len({pid for _, pid in results}) == 2 and os.getpid() not in {pid for _, pid in results}


def job_threads(device: str) -> int:
    return torch.get_num_threads()


def test_cpu_workers_share_the_cores_and_the_last_job_takes_the_idle_workers_cores():
    # 2 cores, 2 workers: jobs 0 and 1 run side by side (1 thread each); job 2 is the last round's only job: both.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert run_on_devices(job_threads, [()] * 3, ["cpu", "cpu"], "test") == [1, 1, 2]
    finally:
        torch.set_num_threads(threads)


def test_threads_of_a_job_are_its_share_of_the_cores_among_the_workers_its_round_keeps_busy():
    assert [threads_for(cores=2, cpu_workers=2, jobs=5, index=i) for i in range(5)] == [1, 1, 1, 1, 2]
    assert [threads_for(cores=2, cpu_workers=2, jobs=2, index=i) for i in range(2)] == [1, 1]  # no short round
    assert [threads_for(cores=16, cpu_workers=5, jobs=5, index=i) for i in range(5)] == [3] * 5
    assert [threads_for(cores=16, cpu_workers=3, jobs=5, index=i) for i in range(5)] == [5, 5, 5, 8, 8]
    assert threads_for(cores=1, cpu_workers=2, jobs=3, index=0) == 1  # never below one


def test_more_devices_than_jobs_start_no_idle_worker():
    assert run_on_devices(lambda device, x: (device, x, os.getpid()), [(1,)], ["cpu", "cpu"], "test") == [
        ("cpu", 1, os.getpid())]  # one job: run here, no worker process at all


def test_one_device_runs_the_jobs_here_in_turn():
    assert run_on_devices(lambda device, x: (device, x, os.getpid()), [(1,), (2,)], ["cpu"], "test") == [
        ("cpu", 1, os.getpid()), ("cpu", 2, os.getpid())]


def test_a_dead_worker_stops_the_stage_with_a_message_and_keeps_what_finished(tmp_path):
    with pytest.raises(PipelineError, match="a worker process died .* re-run to go on"):
        run_on_devices(finish_or_die, [(str(tmp_path), "ok"), (str(tmp_path), "die")], ["cpu", "cpu"], "test")
    assert (tmp_path / "ok").read_text() == "cpu"


def linger(device: str, folder: str, name: str) -> str:
    """A job that writes its worker's process id, then outlasts the test unless its worker is stopped."""
    Path(folder, f"{name}.pid").write_text(str(os.getpid()))
    time.sleep(300)
    return name


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (an exited child nobody reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the workers' state through /proc")
def test_workers_stop_soon_after_their_stage_process_is_killed(tmp_path):
    stage = subprocess.Popen(
        [sys.executable, "-c", "from pipeline.training.devices import run_on_devices; from test_devices import linger; "
         f"run_on_devices(linger, [({str(tmp_path)!r}, 'a'), ({str(tmp_path)!r}, 'b')], ['cpu', 'cpu'], 'test')"],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}, start_new_session=True)
    pid_files = [tmp_path / "a.pid", tmp_path / "b.pid"]
    try:
        deadline = time.monotonic() + 120
        while not all(f.exists() and f.read_text() for f in pid_files):
            assert stage.poll() is None and time.monotonic() < deadline, "the two jobs did not start"
            time.sleep(0.05)
        workers = [int(f.read_text()) for f in pid_files]
        stage.send_signal(signal.SIGKILL)  # as `kill -9` or an out-of-memory kill would: no clean-up runs
        stage.wait()
        deadline = time.monotonic() + 15
        while any(running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(running(pid) for pid in workers), "a worker went on with its job after the stage was killed"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(stage.pid, signal.SIGKILL)  # its own session's group: the stage and any worker left


def test_device_names_resolve_or_fail_with_the_key():
    assert resolve_devices(["cpu", "cpu"], "auto") == ["cpu", "cpu"]
    if not torch.cuda.is_available():
        assert resolve_devices("auto", "auto") == ["cpu"] * torch.get_num_threads()  # a worker per core
        assert resolve_devices(["cpu"], "auto") == ["cpu"]  # one device: the jobs run in this process
        with pytest.raises(PipelineError, match="'cuda:0' is CUDA but no CUDA device"):
            resolve_devices(["cuda:0", "cuda:1"], "auto")
    with pytest.raises(ConfigError, match="train.devices"):
        make_config(Path("unused"), "train.devices=[gpu0]")


@pytest.mark.slow
def test_two_cpu_devices_train_infer_and_tune_as_one_device_does(tmp_path, capfd):
    one = tmp_path / "one" / "work"
    cfg = make_config(one, "backbones=[lcnet_050]", "train.epochs=2")
    prepare.main(cfg)
    folds.main(cfg)
    two = tmp_path / "two" / "work"
    shutil.copytree(one, two)
    parallel = make_config(two, "backbones=[lcnet_050]", "train.epochs=2", TWO_CPUS)

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // 2))  # what each of two CPU workers gets: the same arithmetic
    try:
        train.main(cfg)
    finally:
        torch.set_num_threads(threads)
    train.main(parallel)
    oof, oof_parallel = (pd.read_parquet(c.path("oof") / "lcnet_050.parquet") for c in (cfg, parallel))
    assert oof["id"].tolist() == oof_parallel["id"].tolist() and oof["fold"].tolist() == oof_parallel["fold"].tolist()
    classes = [c for c in oof.columns if c not in ("id", "fold")]
    np.testing.assert_allclose(oof[classes], oof_parallel[classes], atol=1e-4)  # same seeds, same folds
    for fold in (0, 1):
        keys = [torch.load(c.path("models") / "lcnet_050" / f"fold{fold}" / "best.pt", weights_only=True)["key"]
                for c in (cfg, parallel)]
        assert keys[0] == keys[1]
    capfd.readouterr()
    train.main(make_config(two, "backbones=[lcnet_050]", "train.epochs=2"))  # one device after two: nothing to do
    skipped = capfd.readouterr().err
    assert skipped.count("already trained") == 2
    assert skipped.count("at epoch 2), skipped") == 2  # the kept epoch is the last, counted from 1 like the epoch log

    infer.main(cfg)
    infer.main(parallel)
    test, test_parallel = (pd.read_parquet(c.path("preds") / "lcnet_050.parquet") for c in (cfg, parallel))
    np.testing.assert_allclose(test[classes], test_parallel[classes], atol=1e-4)

    tune.main(make_config(two, "backbones=[lcnet_050]", TWO_CPUS, "tune.n_trials=2", "tune.epochs=1"))
    trials = pd.read_csv(parallel.path("tuning") / "lcnet_050" / "trials.csv")
    assert len(trials) == 2 and trials["state"].eq("COMPLETE").all()
    assert trials["user_attrs_worker"].nunique() == 2  # each worker process ran one of the two trials
