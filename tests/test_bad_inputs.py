"""Bad input at every stage: the real CLI exits 2 with a message that names the culprit and the fix.

One table, one row per bad input a competitor may meet: a config typo in every section, wrong
types and out-of-range values, names no table knows (backbone, loss, scheduler, augmentation,
TTA, ensemble method, metric), a broken competition folder, and damaged or missing artifacts
between stages (checkpoints, OOF and test tables, the submission). For each row the stage runs
as ``python -m pipeline.<stage> --config smoke.yaml paths.work_dir=... key=value`` and must:

- exit with status 2 (a ``PipelineError``), with no Python traceback;
- name the key, file, id, class or column at fault, and the word the fix needs;
- leave the work directory exactly as it found it (no half-written file, no temporary left).

The competition-folder rows of tests/test_data.py (corrupt, empty, truncated and missing
images, missing column, duplicate id, NaN label, sample id without image, empty test folder,
ids shared by train and test) are not repeated here.

The artifacts are built once for the module (prepare, folds, train, infer, ensemble and submit
of the smoke preset with one backbone) and copied into each row's own folder before it is
damaged. Importing torch and timm costs several seconds per process on a small CPU, so the
rows run in children forked from one warm interpreter that runs ``pipeline.<stage>`` as
``__main__`` exactly as ``python -m`` does (argv, stderr, exit status, an uncaught exception's
traceback). ``PIPELINE_TEST_COLD_CLI=1`` runs every row in a fresh ``python -m`` process instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, make_config, make_csv_competition
from PIL import Image

from pipeline.config import Paths
from pipeline.layout import overrides_under

SMOKE = ROOT / "configs" / "smoke.yaml"
BACKBONE = "lcnet_050"
# One thread: on a small shared CPU, two torch threads fighting another job's threads run 10x slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ---------------------------------------------------------------- the CLI, run warm or cold

WARM_SERVER = r"""
import json, os, runpy, signal, sys, traceback, warnings
import pipeline.prepare, pipeline.folds, pipeline.train, pipeline.infer, pipeline.ensemble, pipeline.submit
import pipeline.tune
import timm
timm.list_models()  # warm timm's registry too: check_backbone lists it
print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(request["timeout"])
            os.chdir(request["cwd"])
            for fd, name in ((1, "stdout"), (2, "stderr")):
                handle = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(handle, fd)
                os.close(handle)
            sys.argv = [request["module"], *request["args"]]
            # runpy warns that the stage module is already imported (it is, by the warm-up above).
            warnings.filterwarnings("ignore", message=".*found in sys.modules", category=RuntimeWarning)
            try:
                runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as exit:  # what the interpreter does with SystemExit
                if exit.code is None or isinstance(exit.code, int):
                    code = exit.code or 0
                else:
                    print(exit.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class WarmCli:
    """``python -m pipeline.<stage> args`` in a child forked from one interpreter that has torch loaded."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, "-c", WARM_SERVER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
        assert self.process.stdout.readline().strip() == "ready", "the warm CLI server did not start"

    def run(self, module: str, args: list[str], cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
        out, err = cwd / ".cli.stdout", cwd / ".cli.stderr"
        request = {"module": module, "args": args, "cwd": str(cwd), "stdout": str(out), "stderr": str(err),
                   "timeout": timeout}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        returncode = json.loads(self.process.stdout.readline())["returncode"]
        result = subprocess.CompletedProcess([module, *args], returncode, out.read_text(), err.read_text())
        out.unlink()
        err.unlink()
        return result

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=30)


def cold_run(module: str, args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd,
                          env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def cli():
    """A callable ``cli(module, args, cwd) -> CompletedProcess``."""
    if os.environ.get("PIPELINE_TEST_COLD_CLI"):
        yield cold_run
        return
    server = WarmCli()
    yield server.run
    server.close()


# ---------------------------------------------------------------- the artifacts, built once

@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A work dir holding every stage's outputs for the smoke competition and one backbone."""
    import torch

    from pipeline import embed, ensemble, features, folds, infer, prepare, submit, train

    work = tmp_path_factory.mktemp("bad_inputs") / "work"
    cfg = make_config(work, f"backbones=[{BACKBONE}]")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for stage in (prepare, folds, train, infer, features, embed, ensemble, submit):
            stage.main(cfg)
    finally:
        torch.set_num_threads(threads)
    return work


def snapshot(folder: Path) -> dict:
    """Every file below ``folder`` with its size and modification time, and every leftover temporary
    (``*.tmp``) folder; empty folders do not count, nor the run logs (a failed run's log is its record)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in sorted(folder.rglob("*")) if (p.is_file() or p.name.endswith(".tmp"))
            and p.relative_to(folder).parts[0] != Paths().logs}


# ---------------------------------------------------------------- damage, one function per row

def write(relative: str, text: str):
    def damage(tmp: Path, work: Path) -> None:
        (tmp / relative).write_text(text)
    return damage


def delete(*relatives: str):
    def damage(tmp: Path, work: Path) -> None:
        for relative in relatives:
            path = work / relative
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return damage


def truncate(relative: str, keep: int = 1000):
    def damage(tmp: Path, work: Path) -> None:
        path = work / relative
        path.write_bytes(path.read_bytes()[:keep])
    return damage


def edit_table(relative: str, change: Callable[[pd.DataFrame], pd.DataFrame]):
    def damage(tmp: Path, work: Path) -> None:
        path = work / relative
        change(pd.read_parquet(path)).to_parquet(path, index=False)
    return damage


def second_member(file: str, change: Callable[[pd.DataFrame], pd.DataFrame]):
    """Copy the backbone's OOF and test tables as a second member ``resnet10t``, then damage one of them."""
    def damage(tmp: Path, work: Path) -> None:
        for suffix in ("", "_oof"):
            shutil.copy(work / "preds" / f"{BACKBONE}{suffix}.parquet", work / "preds" / f"resnet10t{suffix}.parquet")
        edit_table(f"preds/{file}", change)(tmp, work)
    return damage


def rename_class(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.rename(columns={"p100": "p099"})


def drop_first_row(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.iloc[1:]


def nan_first_row(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame.loc[frame.index[0], ["p000", "p033", "p067", "p100"]] = np.nan
    return frame


def competition(*changes: Callable[[Path], None]):
    """A small Kaggle CSV competition in ``tmp/comp``, changed by ``changes``."""
    def damage(tmp: Path, work: Path) -> None:
        comp = make_csv_competition(tmp / "comp", n_train=24, n_test=6)
        for change in changes:
            change(comp)
    return damage


def corrupt_three_images(comp: Path) -> None:
    (comp / "train" / "tr0003.png").write_bytes(b"not an image at all")
    (comp / "train" / "tr0004.png").write_bytes(b"")
    path = comp / "train" / "tr0005.png"
    path.write_bytes(path.read_bytes()[:60])


def duplicate_sample_id(comp: Path) -> None:
    sample = pd.read_csv(comp / "sample_submission.csv")
    sample.loc[3, "id"] = sample.loc[2, "id"]
    sample.to_csv(comp / "sample_submission.csv", index=False)


def tuned_params(text: str):
    return write(f"work/tuning/{BACKBONE}/best_params.yaml", text)


def both(*damages):
    def damage(tmp: Path, work: Path) -> None:
        for one in damages:
            one(tmp, work)
    return damage


def make_tuning_dir(tmp: Path, work: Path) -> None:
    (work / "tuning" / BACKBONE).mkdir(parents=True)


# ---------------------------------------------------------------- the table

@dataclass
class Case:
    stage: str  # pipeline.<stage>
    args: tuple[str, ...]  # after --config and paths.work_dir; {tmp} is the row's folder
    expect: tuple[str, ...]  # every one must be in stderr
    damage: Callable[[Path, Path], None] | None = None  # (tmp, work) -> None, after the artifacts are copied
    artifacts: bool = False  # start from a copy of the built work dir (else from none)
    config: str = str(SMOKE)


FOLDER = ("data.source=folder", "data.dir={tmp}/comp", "data.image_size=16", "data.workers=1")
CHOICES = "cosine', 'step', 'plateau', 'onecycle' or 'none'"

CASES = {
    # --- config: a typo in every section, named with the close key and the valid ones
    "typo_paths": Case("folds", ("paths.modles=m",), ("'paths.modles'", "did you mean 'paths.models'", "valid keys")),
    "typo_data": Case("folds", ("data.imagesize=32",), ("'data.imagesize'", "did you mean 'data.image_size'")),
    "typo_folds": Case("folds", ("folds.seeds=1",), ("'folds.seeds'", "did you mean 'folds.seed'")),
    "typo_train": Case("train", ("train.lrr=0.1",), ("'train.lrr'", "did you mean 'train.lr'")),
    "typo_tune": Case("tune", ("tune.n_trails=3",), ("'tune.n_trails'", "did you mean 'tune.n_trials'")),
    "typo_infer": Case("infer", ("infer.mrege=mean",), ("'infer.mrege'", "did you mean 'infer.merge'")),
    "typo_ensemble": Case("ensemble", ("ensemble.methd=soft",), ("'ensemble.methd'", "did you mean 'ensemble.method'")),
    "typo_submit": Case("submit", ("submit.knd=label",), ("'submit.knd'", "did you mean 'submit.kind'")),
    "typo_top_level": Case("folds", ("backbone=[lcnet_050]",), ("'backbone'", "did you mean 'backbones'")),
    "typo_in_config_file": Case("folds", (), ("bad.yaml", "'trian'", "did you mean 'train'"),
                                damage=write("bad.yaml", "trian:\n  lr: 0.1\n"), config="{tmp}/bad.yaml"),
    "two_errors_at_once": Case("folds", ("train.lrr=0.1", "data.image_size=0"), ("'train.lrr'", "'data.image_size'")),
    # --- config: wrong types and out-of-range values
    "wrong_type": Case("folds", ("train.batch_size=big",), ("'train.batch_size'", "integer", "'big'")),
    "wrong_type_in_file": Case("folds", (), ("bad.yaml", "'folds.n_splits'", "integer", "'five'"),
                               damage=write("bad.yaml", "folds:\n  n_splits: five\n"), config="{tmp}/bad.yaml"),
    "image_size_0": Case("prepare", ("data.image_size=0",), ("'data.image_size'", "positive")),
    "negative_lr": Case("train", ("train.lr=-0.001",), ("'train.lr'", "greater than 0")),
    "n_splits_1": Case("folds", ("folds.n_splits=1",), ("'folds.n_splits'", "greater than or equal to 2")),
    "elpv_size_too_small": Case("prepare", ("data.elpv_size=60",), ("data.elpv_size 60", "too few images")),
    "missing_config_file": Case("folds", (), ("{tmp}/nope.yaml", "does not exist"), config="{tmp}/nope.yaml"),
    "config_not_yaml": Case("folds", (), ("bad.yaml", "not valid YAML"), damage=write("bad.yaml", "train: [lr: 1\n"),
                            config="{tmp}/bad.yaml"),
    "override_without_value": Case("folds", ("train.lr",), ("'train.lr'", "key.sub=value")),
    # --- names no table knows: each lists the valid ones
    "unknown_scheduler": Case("train", ("train.scheduler=cosin",), ("'train.scheduler'", CHOICES)),
    "unknown_optimizer": Case("train", ("train.optimizer=adamm",), ("'train.optimizer'", "'adamw'", "'sgd'")),
    "unknown_backbone": Case("train", ("backbones=[resnet_18]",), ("'resnet_18'", "not a timm model", "resnet18")),
    "unknown_loss": Case("train", ("train.loss=focall",),
                         ("command-line override 'train.loss'", "(got 'focall')", "'focal'", "'ce+f1'")),
    "unknown_augment": Case("train", ("train.augment=flip",),
                            ("command-line override 'train.augment'", "(got 'flip')", "'flips'", "'heavy'")),
    "unknown_metric": Case("train", ("metric=f1",), ("command-line override 'metric'", "(got 'f1')", "'qwk'")),
    "unknown_metric_ensemble": Case("ensemble", ("metric=f1",), ("'metric'", "(got 'f1')", "'macro_f1'")),
    "unknown_tta": Case("infer", ("infer.tta=[hflip,rot90]",), ("'rot90'", "valid:", "rotate90", "multiscale")),
    "unknown_ensemble_method": Case("ensemble", ("ensemble.method=median",),
                                    ("ensemble.method 'median'", "valid: auto, soft", "stacking")),
    "unknown_ensemble_methods": Case("ensemble", ("ensemble.methods=[soft,blend]",),
                                     ("['blend']", "valid methods:", "caruana")),
    "three_unknown_names_at_once": Case("train", ("train.loss=focall", "train.augment=flip", "train.optimizer=adamm"),
                                        ("'train.loss'", "'train.augment'", "'train.optimizer'", "(got 'adamm')")),
    "unknown_pruner": Case("tune", ("tune.pruner=median2",), ("'tune.pruner'", "'hyperband'")),
    "backbone_option_not_listed": Case("train", ("--backbone", "resnet10t"), ("--backbone resnet10t", BACKBONE)),
    # --- the competition folder (beyond tests/test_data.py's table)
    "missing_competition_dir": Case("prepare", ("data.source=folder", "data.dir={tmp}/no-such-comp"),
                                    ("{tmp}/no-such-comp", "data.dir", "does not exist")),
    "three_bad_images_at_once": Case("prepare", FOLDER, ("3 image(s)", "tr0003.png", "tr0004.png", "tr0005.png",
                                                         "0 bytes", "fix or remove them"),
                                     damage=competition(corrupt_three_images)),
    "missing_group_column": Case("prepare", (*FOLDER, "data.group_col=person"),
                                 ("train.csv", "['person']", "data.group_col"), damage=competition()),
    "missing_id_column": Case("prepare", (*FOLDER, "data.id_col=image_id"), ("['image_id']", "data.id_col"),
                              damage=competition()),
    "duplicate_sample_id": Case("prepare", FOLDER, ("sample_submission.csv", "duplicate id(s)", "te0002"),
                                damage=competition(duplicate_sample_id)),
    "n_splits_above_smallest_class": Case("folds", ("folds.n_splits=10",),
                                          ("folds.n_splits=10", "'p067': 7", "lower folds.n_splits to at most 7"),
                                          artifacts=True),
    # --- a stage run before the one that writes its input: names the file and the stage to run
    "train_before_folds": Case("train", (), ("folds.csv", "does not exist", "run the folds stage"),
                               artifacts=True, damage=delete("folds.csv")),
    "folds_before_prepare": Case("folds", (), ("cache/train.parquet", "does not exist", "run prepare"),
                                 artifacts=True, damage=delete("cache")),
    "infer_before_train": Case("infer", (), ("no trained folds", "run train"), artifacts=True,
                               damage=delete("models")),
    "ensemble_before_infer": Case("ensemble", (), (f"preds/{BACKBONE}.parquet", "does not exist", "run infer"),
                                  artifacts=True, damage=delete(f"preds/{BACKBONE}.parquet")),
    "submit_before_ensemble": Case("submit", (), ("metrics/ensemble.json", "does not exist", "run the ensemble stage"),
                                   artifacts=True, damage=delete("ensemble", "metrics/ensemble.json")),
    "cache_of_other_size": Case("infer", ("data.image_size=48",), ("[32, 32]", "[48, 48]", "run prepare"),
                                artifacts=True),
    # --- checkpoints
    "corrupt_checkpoint": Case("infer", (), (f"{BACKBONE}/fold0/best.pt", "cannot be read",
                                             "delete it and re-run train"),
                               artifacts=True, damage=truncate(f"models/{BACKBONE}/fold0/best.pt")),
    "missing_checkpoint": Case("infer", (), (f"{BACKBONE}/fold1/best.pt", "does not exist", "run train"),
                               artifacts=True, damage=delete(f"models/{BACKBONE}/fold1/best.pt")),
    "corrupt_last_checkpoint": Case("train", (), (f"{BACKBONE}/fold0/last.pt", "cannot be read", "delete it"),
                                    artifacts=True, damage=both(truncate(f"models/{BACKBONE}/fold0/last.pt"),
                                                                delete(f"models/{BACKBONE}/fold0/done.json"))),
    "tuned_params_unknown_key": Case("train", (), ("best_params.yaml", "['lrr']", "re-run tune"), artifacts=True,
                                     damage=both(make_tuning_dir, tuned_params("lrr: 0.1\n"))),
    "tuned_params_out_of_range": Case("train", (), ("best_params.yaml", "lr", "greater than 0", "re-run tune"),
                                      artifacts=True, damage=both(make_tuning_dir, tuned_params("lr: -1.0\n"))),
    # --- OOF and test tables that disagree
    "oof_classes_differ_from_cache": Case("ensemble", (), (f"preds/{BACKBONE}_oof.parquet", "meta.json",
                                                           "different class columns", "p099"),
                                          artifacts=True, damage=edit_table(f"preds/{BACKBONE}_oof.parquet",
                                                                            rename_class)),
    "members_with_different_classes": Case("ensemble", ("backbones=[lcnet_050,resnet10t]",),
                                           ("preds/resnet10t.parquet", f"preds/{BACKBONE}.parquet",
                                            "different class columns"),
                                           artifacts=True, damage=second_member("resnet10t.parquet", rename_class)),
    "members_with_different_ids": Case("ensemble", ("backbones=[lcnet_050,resnet10t]",),
                                       ("preds/resnet10t_oof.parquet", f"preds/{BACKBONE}_oof.parquet",
                                        "different ids", "only in"),
                                       artifacts=True, damage=second_member("resnet10t_oof.parquet", drop_first_row)),
    "test_preds_miss_a_sample_id": Case("ensemble", (), (f"preds/{BACKBONE}.parquet", "sample_submission.csv",
                                                         "different ids", "re-run infer"),
                                        artifacts=True, damage=edit_table(f"preds/{BACKBONE}.parquet", drop_first_row)),
    "corrupt_oof_file": Case("ensemble", (), (f"preds/{BACKBONE}_oof.parquet", "cannot be read",
                                              "delete it and re-run"),
                             artifacts=True, damage=truncate(f"preds/{BACKBONE}_oof.parquet", keep=100)),
    # --- the submission against the sample
    "submission_misses_a_sample_id": Case("submit", (), ("ensemble/test.parquet", "sample_submission.csv",
                                                         "different ids", "re-run ensemble"),
                                          artifacts=True, damage=edit_table("ensemble/test.parquet", drop_first_row)),
    "submission_with_nan": Case("submit", (), ("not valid, nothing was written", "empty (NaN) prediction", "1 id(s)"),
                                artifacts=True, damage=edit_table("ensemble/test.parquet", nan_first_row)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_clearly_and_writes_nothing(name, built, cli, tmp_path):
    case = CASES[name]
    work = tmp_path / "work"
    if case.artifacts:
        shutil.copytree(built, work, ignore=shutil.ignore_patterns("competition"))
    if case.damage is not None:
        case.damage(tmp_path, work)
    before = snapshot(work)
    fill = {"tmp": str(tmp_path)}
    args = ["--config", case.config.format(**fill), *overrides_under(work), f"backbones=[{BACKBONE}]",
            *(a.format(**fill) for a in case.args)]
    result = cli(f"pipeline.{case.stage}", args, tmp_path)
    stderr = result.stderr
    assert result.returncode == 2, f"exit {result.returncode}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    for text in case.expect:
        assert text.format(**fill) in stderr, f"{text!r} not in:\n{stderr[-3000:]}"
    assert snapshot(work) == before, "the failed stage changed the work dir"


# ---------------------------------------------------------------- bad-looking input that must just work

def mixed_images(comp: Path) -> None:
    """Replace some images by grayscale, RGBA, palette, 16-bit, RGB JPEG, and other sizes."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (30, 20), dtype=np.uint8)
    Image.fromarray(np.dstack([pixels] * 3 + [np.full_like(pixels, 200)]), "RGBA").save(comp / "train" / "tr0000.png")
    Image.fromarray(pixels).convert("P").save(comp / "train" / "tr0001.png")
    Image.fromarray(pixels.astype(np.uint16) * 257).save(comp / "train" / "tr0002.png")
    (comp / "train" / "tr0003.png").unlink()
    Image.fromarray(np.dstack([pixels] * 3)).save(comp / "train" / "tr0003.jpg")
    Image.fromarray(rng.integers(0, 255, (7, 90), dtype=np.uint8)).save(comp / "train" / "tr0004.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(comp / "test" / "te0000.png")


@pytest.mark.parametrize("channels", [1, 3])
def test_mixed_modes_and_sizes_just_work(cli, tmp_path, channels):
    competition(mixed_images)(tmp_path, tmp_path / "work")
    args = ["--config", str(SMOKE), *overrides_under(tmp_path / "work"),
            *(a.format(tmp=tmp_path) for a in FOLDER), f"data.channels={channels}"]
    result = cli("pipeline.prepare", args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    images = np.load(tmp_path / "work" / "cache" / "train.npy")
    assert images.shape == (24, 16, 16, channels) and images.dtype == np.uint8
    assert images.reshape(24, -1).std(axis=1).min() > 0  # every image decoded, none left blank
