"""Faults: a stage killed at any point, a diverging model, a read-only or full disk.

- SIGKILL during prepare (while building the competition folder, while decoding the cache)
  and during train leaves the previous outputs or none, every file on disk whole; running
  again finishes the work, train from its last checkpoint, and removes the killed run's
  temporary files.
- A diverging run (NaN loss, NaN outputs) stops the fold naming the epoch and what to
  lower, and writes no OOF.
- A folder that cannot be written and a disk that fills up mid-write give a message naming
  the file and the cause, and leave the previous file untouched.

A killed Optuna worker is covered by tests/test_tune.py (test_dead_worker_trial_is_failed_and_the_study_goes_on).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, make_config

from pipeline import cli, folds, prepare, train
from pipeline.artifacts import atomic_dir, atomic_path, write_text
from pipeline.config import Paths
from pipeline.errors import DataError, PipelineError
from pipeline.layout import overrides_under
from pipeline.training import fold_setup

SMOKE = str(ROOT / "configs" / "smoke.yaml")
BACKBONE = "lcnet_050"
# One thread: on a small shared CPU, two torch threads fighting another job's threads run 10x slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_torch_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The smoke competition prepared and folded once; tests work on copies."""
    work = tmp_path_factory.mktemp("faults") / "work"
    cfg = make_config(work, f"backbones=[{BACKBONE}]")
    prepare.main(cfg)
    folds.main(cfg)
    return work


@pytest.fixture
def work(prepared, tmp_path) -> Path:
    copy = tmp_path / "work"
    shutil.copytree(prepared, copy)
    return copy


def config(work: Path, *overrides: str):
    return make_config(work, f"backbones=[{BACKBONE}]", *overrides)


def leftovers(folder: Path) -> list[str]:
    """Temporary files and folders of atomic writers (``.<name>.<pid>@<host>.<random>.tmp``, ``.<name>.old``)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if p.name.endswith((".tmp", ".old")))


def file_state(folder: Path) -> dict:
    """Every file below ``folder`` and its bytes, but the run logs (a failed run's log is its record)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).parts[0] != Paths().logs}


def run_cli(stage_main, work: Path, *overrides: str, capsys) -> str:
    """The stage's command line in this process: returns stderr after asserting exit status 2."""
    with pytest.raises(SystemExit) as exit:
        cli.run(stage_main, "test", ["--config", SMOKE, *overrides_under(work), f"backbones=[{BACKBONE}]",
                                     *overrides])
    assert exit.value.code == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------- SIGKILL

def start(stage: str, work: Path, log: Path, *overrides: str) -> subprocess.Popen:
    """``python -m pipeline.<stage>`` in its own process group (so the kill takes any worker with it)."""
    return subprocess.Popen([sys.executable, "-m", f"pipeline.{stage}", "--config", SMOKE, *overrides_under(work),
                             *overrides], stdout=subprocess.DEVNULL, stderr=log.open("w"), env=ENV,
                            start_new_session=True)


def kill_when(process: subprocess.Popen, ready, log: Path, timeout: float = 120) -> None:
    """SIGKILL the process group as soon as ``ready()`` is true."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert process.poll() is None, f"finished before the kill point:\n{log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"kill point not reached in {timeout}s:\n{log.read_text()[-2000:]}"
            time.sleep(0.01)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL


def finish(stage: str, work: Path, *overrides: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", f"pipeline.{stage}", "--config", SMOKE, *overrides_under(work),
                             *overrides], capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def temporaries(work: Path, name: str) -> list[Path]:
    return list(work.glob(f".{name}.*.tmp"))


@pytest.mark.slow
def test_prepare_killed_at_any_point_leaves_the_previous_cache_or_none(tmp_path):
    work, log = tmp_path / "work", tmp_path / "prepare.log"
    elpv = ["data.elpv_size=800"]

    # Killed while building the competition folder: no folder, no cache.
    kill_when(start("prepare", work, log, *elpv, "data.image_size=64"),
              lambda: temporaries(work, "competition"), log)
    assert not (work / "competition").exists() and not (work / "cache").exists()

    # Killed while decoding the images: the competition is whole, there is no cache.
    kill_when(start("prepare", work, log, *elpv, "data.image_size=64"),
              lambda: any((t / "train.npy").exists() for t in temporaries(work, "cache")), log)
    assert json.loads((work / "competition" / "elpv.json").read_text())["elpv_size"] == 800
    assert not (work / "cache").exists() and temporaries(work, "cache")

    # Running again finishes and removes what the killed runs left.
    finish("prepare", work, *elpv, "data.image_size=64")
    assert leftovers(work) == []
    complete = file_state(work / "cache")
    meta = json.loads(complete["meta.json"])
    assert meta["size_hw"] == [64, 64]
    assert np.load(work / "cache" / "train.npy").shape[1:] == (64, 64, 1)

    # Killed while rebuilding with other settings: the previous complete cache is still there.
    kill_when(start("prepare", work, log, *elpv, "data.image_size=48"),
              lambda: any((t / "train.npy").exists() for t in temporaries(work, "cache")), log)
    assert file_state(work / "cache") == complete
    finish("prepare", work, *elpv, "data.image_size=48")
    assert json.loads((work / "cache" / "meta.json").read_text())["size_hw"] == [48, 48]
    assert leftovers(work) == []


def decoding_workers(parent: int) -> list[int]:
    """Process ids of the spawned image-decoding workers of ``parent`` (not its resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes()
            if ppid == parent and b"spawn_main" in command:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker processes through /proc")
def test_a_decoding_worker_that_dies_fails_prepare_clearly_instead_of_hanging(tmp_path):
    work, log = tmp_path / "work", tmp_path / "prepare.log"
    finish("prepare", work, "data.image_size=16", "data.elpv_size=null")  # every ELPV image, a first cache
    before = file_state(work / "cache")
    # Again at another size with two worker processes (prepare uses them from 1,000 images).
    process = start("prepare", work, log, "data.image_size=24", "data.elpv_size=null", "data.workers=2")
    deadline = time.monotonic() + 120
    while not (workers := decoding_workers(process.pid)):
        assert process.poll() is None, f"finished before a worker started:\n{log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, "no decoding worker started in 120 s"
        time.sleep(0.01)
    os.kill(workers[0], signal.SIGKILL)
    try:
        process.wait(timeout=120)  # multiprocessing.Pool would wait forever here
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    message = log.read_text()
    assert process.returncode == 2, message[-2000:]
    assert "died" in message and "data.workers=1" in message and "Traceback" not in message
    assert file_state(work / "cache") == before  # the previous cache is untouched


def test_only_the_broken_pool_cleanup_race_is_kept_quiet(monkeypatch):
    """CPython 3.11's executor thread can fail while cleaning up after a dead worker (seen in CI):
    prepare already reports the dead worker, so that thread's traceback is dropped; any other
    thread's error still reaches the previous hook, which is back in place afterwards."""
    import concurrent.futures.process
    import threading

    seen = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(str(args.exc_value)))
    # A function of that name in that file, as the executor's own frame would be.
    code = compile("def terminate_broken():\n    raise RuntimeError('dictionary changed size during iteration')\n",
                   concurrent.futures.process.__file__, "exec")
    scope: dict = {}
    exec(code, scope)

    def other():
        raise RuntimeError("an error of this program")

    with prepare.quiet_broken_pool_cleanup():
        for target in (scope["terminate_broken"], other):
            thread = threading.Thread(target=target)
            thread.start()
            thread.join()
    assert seen == ["an error of this program"]
    thread = threading.Thread(target=scope["terminate_broken"])
    thread.start()
    thread.join()
    assert seen == ["an error of this program", "dictionary changed size during iteration"]


def test_a_pool_that_breaks_while_starting_a_worker_is_reported_as_a_dead_worker(tmp_path, monkeypatch):
    """CPython 3.11 can fail the start of a worker with OSError "handle is closed" when another worker has just
    died (seen in CI): prepare reports it as the dead worker it is, not as a folder it cannot write."""

    class PoolBrokenAtStart:
        def __init__(self, *args, **kwargs):
            pass

        def map(self, *args, **kwargs):
            raise OSError("handle is closed")

        def shutdown(self, *args, **kwargs):
            pass

    monkeypatch.setattr(prepare, "ProcessPoolExecutor", PoolBrokenAtStart)
    with pytest.raises(PipelineError, match="decoding images died .*handle is closed.*data.workers=1"):
        prepare.decode_split([f"{n}.png" for n in range(1000)], (8, 8), 1, tmp_path / "train.npy", 2, "train")


@pytest.mark.slow
def test_train_killed_mid_fold_resumes_from_its_last_checkpoint(work, tmp_path):
    import torch

    log = tmp_path / "train.log"
    last = work / "models" / BACKBONE / "fold0" / "last.pt"
    overrides = (f"backbones=[{BACKBONE}]", "train.epochs=3")
    kill_when(start("train", work, log, *overrides), last.exists, log)

    checkpoints = sorted((work / "models").rglob("*.pt"))
    assert last in checkpoints
    for path in checkpoints:  # every checkpoint on disk is whole
        torch.load(path, map_location="cpu", weights_only=False)
    epoch = torch.load(last, weights_only=False)["epoch"]
    assert epoch < 2, "killed after fold 0 had finished: nothing left to resume"
    assert not (work / "oof").exists()

    result = finish("train", work, *overrides)
    assert f"fold 0: resuming from {last} at epoch {epoch + 2}/3" in result.stderr, result.stderr[-3000:]
    oof = pd.read_parquet(work / "oof" / f"{BACKBONE}.parquet")
    fold_table = pd.read_csv(work / "folds.csv")
    assert sorted(oof["id"]) == sorted(fold_table["id"]) and oof["id"].is_unique
    np.testing.assert_allclose(oof.drop(columns=["id", "fold"]).sum(axis=1), 1.0, atol=1e-6)
    for fold in (0, 1):
        assert torch.load(work / "models" / BACKBONE / f"fold{fold}" / "last.pt", weights_only=False)["epoch"] == 2
    assert leftovers(work) == []


def test_atomic_dir_puts_back_a_previous_folder_a_kill_left_aside(tmp_path):
    # A kill between the swap's two renames leaves the previous folder as .<name>.old and none in place.
    (tmp_path / ".cache.old").mkdir()
    (tmp_path / ".cache.old" / "meta.json").write_text("previous")
    with pytest.raises(DataError), atomic_dir(tmp_path / "cache"):
        raise DataError("this run fails too")
    assert (tmp_path / "cache" / "meta.json").read_text() == "previous"
    assert leftovers(tmp_path) == []


def test_a_dead_writers_temporary_is_removed_a_live_ones_kept(tmp_path):
    import socket

    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".folds.csv.{int(dead.stdout)}@{host}.x1.tmp"
    live = tmp_path / f".folds.csv.{os.getpid()}@{host}.x2.tmp"
    other_host = tmp_path / f".folds.csv.{int(dead.stdout)}@not-{host}.x3.tmp"
    for path in (stale, live, other_host):
        path.write_text("partial")
    write_text(tmp_path / "folds.csv", "id,fold\n")
    assert not stale.exists() and live.exists() and other_host.exists()


# ---------------------------------------------------------------- divergence

def nan_loss_from(epoch: int, step: int):
    """A make_loss whose loss turns NaN at (epoch, step) of each fold, as a diverging run's does."""
    real = fold_setup.make_loss

    def make_loss(train, heads, targets):
        compute_loss, losses = real(train, heads, targets)
        calls = {"count": 0}
        steps_per_epoch = len(targets) // train.batch_size

        def diverging(logits, batch_targets):
            loss = compute_loss(logits, batch_targets)
            calls["count"] += 1
            if calls["count"] > epoch * steps_per_epoch + step:
                return loss * float("nan")
            return loss

        return diverging, losses

    return make_loss


def test_nan_loss_stops_the_fold_naming_the_epoch_and_writes_no_oof(work, monkeypatch):
    monkeypatch.setattr(fold_setup, "make_loss", nan_loss_from(epoch=1, step=1))
    cfg = config(work, "train.epochs=3")
    with pytest.raises(PipelineError) as error:
        train.main(cfg)
    message = str(error.value)
    for text in ("nan", "step 1", "fold 0 epoch 2/3", "lower train.lr", "train.grad_clip"):
        assert text in message, message
    assert not cfg.path("oof").exists() and not cfg.path("metrics").exists()
    # The last checkpoint is the last good epoch's, so a re-run with a lower lr has something sane to compare.
    import torch

    checkpoint = torch.load(cfg.path("models") / BACKBONE / "fold0" / "last.pt", weights_only=False)
    assert checkpoint["epoch"] == 0
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values() if t.is_floating_point())


def test_diverging_weights_stop_train_with_exit_2_and_no_oof(work, capsys):
    err = run_cli(train.main, work, "train.lr=1e6", capsys=capsys)  # the loss stays finite, the outputs do not
    for text in ("fold 0 epoch 1", "NaN", "lower train.lr", "train.grad_clip"):
        assert text in err, err
    assert not (work / "oof").exists()


# ---------------------------------------------------------------- a folder that cannot be written

@contextlib.contextmanager
def read_only(folder: Path):
    """Make ``folder`` unwritable: chmod for a normal user; for root, whom chmod does not stop, the
    immutable attribute (``chattr +i``, ext2/3/4, XFS, Btrfs)."""
    if os.geteuid() != 0:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(mode)
        return
    chattr = shutil.which("chattr")
    made = chattr and subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode == 0
    if not made:
        pytest.skip("running as root, which chmod does not stop, on a filesystem without chattr +i")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(folder)], check=True)


@pytest.mark.parametrize("how", ["file_in_the_way", "read_only_folder"])
def test_unwritable_folds_output_names_it_and_keeps_the_previous_file(work, capsys, how):
    before = file_state(work)
    if how == "file_in_the_way":
        (work / "blocker").write_text("a file where the output folder should be")
        before = file_state(work)
        err = run_cli(folds.main, work, f"paths.folds={work / 'blocker' / 'folds.csv'}", capsys=capsys)
        expected = (f"cannot create folder {work / 'blocker'}", "a file stands where a folder should be")
    else:
        with read_only(work):
            err = run_cli(folds.main, work, "folds.seed=7", capsys=capsys)
        expected = (f"cannot write {work / 'folds.csv'}", "read-only", "The previous folds.csv is untouched",
                    "make it writable")
    for text in expected:
        assert text in err, err
    assert file_state(work) == before


def test_unwritable_cache_folder_keeps_the_previous_cache(work, capsys):
    before = file_state(work / "cache")
    with read_only(work):
        err = run_cli(prepare.main, work, "data.image_size=24", capsys=capsys)
    for text in (f"cannot write {work / 'cache'}", "read-only", "The previous cache is untouched"):
        assert text in err, err
    assert file_state(work / "cache") == before and leftovers(work) == []


# ---------------------------------------------------------------- a full disk

def test_disk_full_inside_atomic_path_becomes_a_data_error(tmp_path):
    target = tmp_path / "scores.json"
    target.write_text("previous")
    with pytest.raises(DataError) as error, atomic_path(target) as temporary:
        temporary.write_text("half of the")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    message = str(error.value)
    assert str(target) in message and "No space left on device" in message and "disk full" in message
    assert "The previous scores.json is untouched" in message
    assert target.read_text() == "previous" and sorted(os.listdir(tmp_path)) == ["scores.json"]


def test_disk_full_while_writing_folds_keeps_the_previous_file(work, capsys, monkeypatch):
    def half_then_full(frame, path, **kwargs):
        Path(path).write_text(frame.to_string()[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_full)
    before = file_state(work)
    err = run_cli(folds.main, work, "folds.seed=7", capsys=capsys)
    for text in (str(work / "folds.csv"), "disk full", "free space or set paths.work_dir"):
        assert text in err, err
    assert file_state(work) == before


def limit_file_size(size: int):
    """A real write failure from the kernel: files cannot grow past ``size`` bytes (EFBIG), as on a full disk."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


@pytest.mark.parametrize(("stage", "overrides", "target", "expected"), [
    ("folds", ("folds.seed=7",), "folds.csv", ("File too large", "disk full")),
    ("prepare", ("data.image_size=48",), "cache", ("File too large", "disk full")),
], ids=["folds", "prepare"])
def test_a_real_write_failure_mid_file_fails_clearly(work, stage, overrides, target, expected):
    before = file_state(work)
    result = subprocess.run([sys.executable, "-m", f"pipeline.{stage}", "--config", SMOKE, *overrides_under(work),
                             f"backbones=[{BACKBONE}]", *overrides], capture_output=True, text=True, env=ENV,
                            preexec_fn=limit_file_size(2000), timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"cannot write {work / target}" in result.stderr, result.stderr[-3000:]
    for text in expected:
        assert text in result.stderr, result.stderr[-3000:]
    after = file_state(work)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing that was there changed
    assert leftovers(work) == []


def test_a_checkpoint_write_that_fails_names_it(work, capsys, monkeypatch):
    import torch

    def failing_save(payload, path, *args, **kwargs):
        Path(path).write_bytes(b"PK half a zip")
        # What torch raises when the kernel refuses a write (seen on a full tmpfs): no errno, no file name.
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 307520 vs 307416")

    monkeypatch.setattr(torch, "save", failing_save)
    err = run_cli(train.main, work, capsys=capsys)
    target = work / "models" / BACKBONE / "fold0" / "best.pt"
    for text in (f"cannot write {target}", "torch.save failed", "Nothing was written", "free space"):
        assert text in err, err
    assert not target.exists() and leftovers(work) == [] and not (work / "oof").exists()
