"""train.loggers: every fold's per-epoch metrics reach DVCLive, TensorBoard and wandb (offline); a logger whose
package is missing stops the stage before any work, naming the extra; changing the loggers retrains nothing."""

import json
import struct
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import make_config

from pipeline import folds, layout, prepare, train
from pipeline.errors import ConfigError
from pipeline.training import kfold, loggers

BACKBONE = "lcnet_050"
METRICS = ("train_loss", "val_loss", "macro_f1", "lr")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    work = tmp_path_factory.mktemp("loggers") / "work"
    cfg = make_config(work, f"backbones=[{BACKBONE}]")
    prepare.main(cfg)
    folds.main(cfg)
    return work


def fold_history(cfg, fold: int) -> list[dict]:
    """The epochs of a finished fold, as train keeps them in its done.json."""
    return json.loads((layout.fold_dir(cfg, BACKBONE, fold) / layout.FOLD_DONE).read_text())["history"]


# ---------------------------------------------------------------- a missing package, an unknown logger

@pytest.mark.parametrize("logger", ["tensorboard", "wandb"])
def test_a_logger_without_its_package_stops_train_before_any_work(tmp_path, monkeypatch, logger):
    real_find_spec = loggers.importlib.util.find_spec
    monkeypatch.setattr(loggers.importlib.util, "find_spec",
                        lambda name, *args: None if name == logger else real_find_spec(name, *args))
    # Nothing is prepared in this work folder: an error about the data would mean the check came too late.
    cfg = make_config(tmp_path / "work", f"backbones=[{BACKBONE}]", f"train.loggers=[dvclive, {logger}]")
    with pytest.raises(ConfigError, match=rf"train.loggers.*pip install 'kaggle-image-pipeline\[{logger}\]'"):
        train.main(cfg)
    loggers.check_loggers(make_config(tmp_path / "work", "train.loggers=[dvclive]"))  # dvclive is a core dependency


def test_an_unknown_logger_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="train.loggers"):
        make_config(tmp_path / "work", "train.loggers=[mlflow]")


def test_changing_the_loggers_does_not_retrain_a_fold(tmp_path):
    """The fold settings key (a change retrains the fold) leaves out where the metrics are logged."""
    heads = SimpleNamespace(to_dict=lambda: {"class_names": ["a", "b"]})
    data = kfold.TrainingData(np.zeros((2, 4, 4, 1), np.uint8), np.array(["x", "y"]), np.array([0, 1]),
                              np.zeros((2, 1), np.int64), np.zeros(2, np.int64), heads, [0.5], [0.2])

    def key(*overrides):
        return kfold.settings_key(make_config(tmp_path, *overrides), BACKBONE, data, 0)

    assert key() == key("train.loggers=[tensorboard, wandb]", "train.wandb_project=other") != key("train.lr=0.001")


# ---------------------------------------------------------------- the loggers on a smoke run

def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def wandb_records(run_file):
    """The records of an offline run's .wandb file (a LevelDB-style log of protobuf records: 7-byte header, then
    32 KiB blocks of chunks with a 7-byte header each), which wandb has no public reader for."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run(run_file) -> tuple[str, list[dict]]:
    """(the run's name, its logged history rows)."""
    name, rows = None, []
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            name = record.run.display_name
        elif kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return name, rows


@pytest.mark.slow
def test_every_fold_reaches_dvclive_tensorboard_and_offline_wandb(prepared, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)  # offline by default, into the work folder, with no key
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))  # nothing into the home folder
    cfg = make_config(prepared, f"backbones=[{BACKBONE}]", "train.loggers=[dvclive, tensorboard, wandb]",
                      "train.wandb_project=smoke-project")
    train.main(cfg)

    runs = sorted((layout.wandb_dir(cfg) / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2
    logged_runs = dict(wandb_run(run) for run in runs)
    assert sorted(logged_runs) == [f"{BACKBONE}-fold0", f"{BACKBONE}-fold1"]
    for fold in (0, 1):
        history = fold_history(cfg, fold)
        scalars = tensorboard_scalars(layout.fold_logs_dir(cfg, "tensorboard", BACKBONE, fold))
        assert set(scalars) == set(METRICS)
        rows = logged_runs[f"{BACKBONE}-fold{fold}"]
        assert len(rows) == len(history) == cfg.train.epochs
        for step, (epoch, row) in enumerate(zip(history, rows)):
            for metric in METRICS:
                assert scalars[metric][step] == (step, pytest.approx(epoch[metric], rel=1e-6))  # float32 events
                assert row[metric] == pytest.approx(epoch[metric]) and row["_step"] == step
        dvclive = layout.fold_logs_dir(cfg, "dvclive", BACKBONE, fold) / "plots" / "metrics"
        assert sorted(p.stem for p in dvclive.glob("*.tsv")) == sorted(METRICS)
        curve = pd.read_csv(layout.fold_curves_dir(cfg, BACKBONE) / "val_loss.tsv", sep="\t")
        assert curve[curve["fold"] == fold]["val_loss"].tolist() == pytest.approx([e["val_loss"] for e in history])
