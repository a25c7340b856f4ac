"""Stage tune: the search space check, and real Optuna studies on the smoke preset.

The studies run on the real storages: the default journal file and a throwaway PostgreSQL
server (skipped only where PostgreSQL or psycopg2 is not installed). One prepared cache is
shared by the module; each test tunes into its own ``paths.tuning`` folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings

import optuna
import pandas as pd
import pytest
import yaml
from conftest import ROOT, make_config
from optuna.trial import TrialState
from pg_cluster import find_bin_dir, postgres_cluster

import pipeline.folds
import pipeline.prepare
from pipeline import cli, tune
from pipeline.errors import ConfigError
from pipeline.training import studies
from pipeline.training.kfold import load_training_data, tuned_config

BACKBONE = "lcnet_050"
# One training batch per epoch, drawn in order (no oversampling), so trials compare deterministically.
FAST = [f"backbones=[{BACKBONE}]", "tune.max_train=32", "train.oversample=false"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A work dir with the smoke cache and folds, prepared once for the module."""
    work_dir = tmp_path_factory.mktemp("tune") / "work"
    cfg = make_config(work_dir, *FAST)
    pipeline.prepare.main(cfg)
    pipeline.folds.main(cfg)
    return work_dir


def config(work_dir, name: str, *overrides: str):
    return make_config(work_dir, *FAST, f"paths.tuning=tuning_{name}", *overrides)


def name_of(cfg) -> str:
    return tune.study_name(cfg, BACKBONE, load_training_data(cfg))


def trials_of(cfg):
    return optuna.load_study(study_name=name_of(cfg), storage=studies.open_storage(cfg)).get_trials()


def running_trials(cfg) -> list:
    """The study's trials once a worker has created it, else none."""
    try:
        return trials_of(cfg)
    except KeyError:  # no such study yet
        return []


def start_worker(work_dir, name: str, *overrides: str) -> subprocess.Popen:
    """A ``python -m pipeline.tune`` process, one thread so that two of them share the cores fairly."""
    command = [sys.executable, "-m", "pipeline.tune", "--config", str(ROOT / "configs" / "smoke.yaml"),
               f"paths.work_dir={work_dir}", *FAST, f"paths.tuning=tuning_{name}", *overrides]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def finish(*workers: subprocess.Popen) -> None:
    for worker in workers:
        _, stderr = worker.communicate(timeout=300)
        assert worker.returncode == 0, stderr[-3000:]


def assert_shared(cfg, workers: int, trials: int) -> None:
    """One study holding ``trials`` finished trials, contributed by ``workers`` distinct processes."""
    assert optuna.get_all_study_names(studies.open_storage(cfg)) == [name_of(cfg)]
    study_trials = trials_of(cfg)
    assert len(study_trials) == trials
    assert all(t.state == TrialState.COMPLETE for t in study_trials), [t.state for t in study_trials]
    assert len({t.user_attrs["worker"] for t in study_trials}) == workers


# ---------------------------------------------------------------- the search space, without training

@pytest.mark.parametrize("space, message", [
    ("{weight_decy: {type: float, low: 0.001, high: 0.1}}", "no key 'weight_decy'; did you mean 'weight_decay'?"),
    ("{lrate: {type: float, low: 0.001, high: 0.1}}", "weight_decay, optimizer"),
    ("{loss: {type: categorical, choices: [ce, nonsense]}}", "tune.space.loss: 'nonsense' is not a valid train.loss"),
    ("{optimizer: {type: categorical, choices: [adamw, adamx]}}", "'adamx' is not a valid train.optimizer"),
    ("{augment: {type: categorical, choices: [flips, nonsense]}}", "nonsense"),
    ("{drop_rate: {type: float, low: 0.0, high: 1.5}}", "1.5 is not a valid train.drop_rate"),
    ("{lr: {type: float, low: 0.0, high: 0.1, log: true}}", "tune.space.lr"),
    ("{batch_size: {type: int, low: 8, high: 64.5}}", "integer"),
    ("{epochs: {type: int, low: 1, high: 9}}", "tune.epochs"),
])
def test_bad_space_fails_before_any_work(tmp_path, space, message):
    cfg = make_config(tmp_path / "work", f"tune.space={space}")
    with pytest.raises(ConfigError, match="tune.space") as raised:
        tune.main(cfg)
    assert message in str(raised.value)
    assert not (tmp_path / "work").exists()


def test_space_of_every_kind_is_accepted(tmp_path):
    space = ("{lr: {type: float, low: 0.0003, high: 0.01, log: true}, batch_size: {type: int, low: 16, high: 64, "
             "step: 16}, loss: {type: categorical, choices: [ce, focal]}, optimizer: {type: categorical, "
             "choices: [adamw, sgd]}, augment: {type: categorical, choices: [flips]}}")
    distributions = tune.search_space(make_config(tmp_path / "work", f"tune.space={space}"))
    assert list(distributions) == ["lr", "batch_size", "loss", "optimizer", "augment"]
    assert distributions["batch_size"].step == 16


def test_tuning_off_writes_empty_best_params(tmp_path):
    cfg = make_config(tmp_path / "work", *FAST, "tune.enabled=false")
    assert tune.main(cfg) == {BACKBONE: {"trials": 0, "best_params": {}}}
    path = cfg.path("tuning") / BACKBONE / "best_params.yaml"
    assert yaml.safe_load(path.read_text()) == {}
    assert tuned_config(cfg, BACKBONE).train == cfg.train
    # The plots folder (DVC's output) holds one figure saying why there is no study, not nothing.
    assert [p.name for p in (cfg.path("plots") / "tuning" / BACKBONE).iterdir()] == [tune.UNTUNED_PLOT]


def test_unreachable_storage_names_it_without_password(tmp_path, capsys):
    argv = ["--config", str(ROOT / "configs" / "smoke.yaml"), f"paths.work_dir={tmp_path / 'work'}",
            "tune.storage=postgresql://user:secret@127.0.0.1:1/db"]
    with pytest.raises(SystemExit) as raised:
        cli.run(tune.main, "tune", argv=argv, backbone_option=True)
    message = capsys.readouterr().err
    assert raised.value.code == 2
    assert "postgresql://user:***@127.0.0.1:1/db" in message
    assert "secret" not in message


@pytest.mark.parametrize(("direction", "untuned", "best", "min_gain", "chosen"), [
    ("maximize", 0.50, 0.51, 0.02, 0),  # within the noise margin: the untuned config stays
    ("maximize", 0.50, 0.53, 0.02, 1),  # a real gain: the best trial
    ("maximize", 0.50, 0.51, 0.0, 1),  # no margin: plain best
    ("minimize", 1.00, 0.99, 0.02, 0),  # log loss: lower is better, the same margin
    ("minimize", 1.00, 0.90, 0.02, 1),
])
def test_best_params_keep_the_untuned_config_unless_the_gain_clears_min_gain(tmp_path, direction, untuned, best,
                                                                             min_gain, chosen):
    cfg = make_config(tmp_path / "work", *FAST, f"tune.min_gain={min_gain}")
    study = optuna.create_study(direction=direction)
    space = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}
    study.add_trial(optuna.trial.create_trial(params={"lr": 3e-3}, distributions=space, value=untuned,
                                              user_attrs={"origin": tune.UNTUNED_ORIGIN}))
    study.add_trial(optuna.trial.create_trial(params={"lr": 5e-2}, distributions=space, value=best))
    trial, note = tune.chosen_trial(cfg, study)
    assert trial.number == chosen and (("kept" in note) == (chosen == 0))


# ---------------------------------------------------------------- real studies

@pytest.mark.slow
def test_study_writes_best_params_that_train_uses(work):
    cfg = config(work, "best")
    result = tune.main(cfg)[BACKBONE]
    folder = cfg.path("tuning") / BACKBONE
    best = yaml.safe_load((folder / "best_params.yaml").read_text())
    assert set(best) == set(cfg.tune.space) and best == result["best_params"]

    trials = (folder / "trials.csv").read_text().splitlines()
    assert len(trials) == 1 + 2 and trials[0].startswith("number,state,value,params_")
    plots = cfg.path("plots") / "tuning" / BACKBONE  # where dvc plots show finds them
    assert "history.png" in result["plots"] and (plots / "history.png").stat().st_size > 0
    first = trials_of(cfg)[0]
    assert first.params == {name: getattr(cfg.train, name) for name in cfg.tune.space}  # the untuned config first

    trained = tuned_config(cfg, BACKBONE).train
    assert {name: getattr(trained, name) for name in best} == best
    assert tuned_config(make_config(work, *FAST, "paths.tuning=tuning_best", "train.use_tuned=false"),
                        BACKBONE).train.lr == cfg.train.lr


@pytest.mark.slow
def test_rerun_continues_the_study_and_a_hopeless_trial_is_pruned(work):
    # Log loss moves at every step (macro F1 sits at the majority class on this tiny set), and two
    # good trials give the median pruner its reference: then a learning rate of 1e-9 cannot keep up.
    overrides = ("metric=log_loss", "tune.epochs=3", "tune.pruner=median",
                 "tune.space={lr: {type: float, low: 0.001, high: 0.01, log: true}}")
    cfg = config(work, "prune", *overrides)
    tune.main(cfg)
    assert len(trials_of(cfg)) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna warns that 1e-9 is outside the space: that is the point
        tune.open_study(cfg, BACKBONE).enqueue_trial({"lr": 1e-9})
        result = tune.main(config(work, "prune", *overrides, "tune.n_trials=1"))[BACKBONE]

    trials = trials_of(cfg)
    assert [t.number for t in trials] == [0, 1, 2]  # the re-run continued the study
    assert len((cfg.path("tuning") / BACKBONE / "trials.csv").read_text().splitlines()) == 1 + 3
    good, other, hopeless = trials
    assert good.state == other.state == TrialState.COMPLETE
    assert hopeless.params == {"lr": 1e-9} and hopeless.state == TrialState.PRUNED
    assert hopeless.last_step < cfg.tune.epochs - 1  # stopped before the last epoch
    assert result["pruned"] == 1 and result["best_params"]["lr"] != 1e-9
    assert "intermediate.png" in result["plots"]


@pytest.mark.slow
def test_a_changed_setting_starts_a_fresh_study_with_its_own_untuned_trial(work):
    first = config(work, "fresh", "tune.n_trials=1", "train.lr=0.003")
    tune.main(first)
    second = config(work, "fresh", "tune.n_trials=1", "train.lr=0.009")  # a searched key's own value changed
    tune.main(second)
    assert yaml.safe_load((second.path("tuning") / BACKBONE / "best_params.yaml").read_text())["lr"] == 0.009
    third = config(work, "fresh", "tune.n_trials=1", "train.lr=0.009", "train.label_smoothing=0.0",
                   "tune.space={lr: {type: float, low: 0.001, high: 0.01, log: true}}")
    tune.main(third)  # a key the search does not touch changed too
    names = optuna.get_all_study_names(studies.open_storage(first))
    assert sorted(names) == sorted({name_of(first), name_of(second), name_of(third)}) and len(names) == 3
    assert [t.params for t in trials_of(second)] == [{name: getattr(second.train, name) for name in second.tune.space}]
    assert len(trials_of(first)) == 1  # the old study is left as it was, not mixed with the new trials
    again = config(work, "fresh", "tune.n_trials=1", "train.lr=0.009")
    tune.main(again)
    assert len(trials_of(again)) == 2  # the same settings join their study


@pytest.mark.slow
def test_diverging_trial_fails_and_the_study_goes_on(work):
    cfg = config(work, "diverge")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 1000 is outside the space: that is the point
        tune.open_study(cfg, BACKBONE).enqueue_trial({"lr": 1000.0})
        result = tune.main(cfg)[BACKBONE]
    untuned, diverged = trials_of(cfg)
    assert untuned.state == TrialState.COMPLETE and diverged.state == TrialState.FAIL
    assert "lr" in diverged.user_attrs["error"]  # train's message says what to lower
    assert result["best_params"] == untuned.params


@pytest.mark.slow
def test_two_workers_share_one_journal_study(work):
    workers = [start_worker(work, "journal", "tune.n_trials=1") for _ in range(2)]
    finish(*workers)
    assert_shared(config(work, "journal"), workers=2, trials=2)


@pytest.fixture(scope="module")
def postgres():
    """``database(name) -> URL`` on a throwaway PostgreSQL server, for the module."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl): apt-get install postgresql")
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed: pip install psycopg2-binary")
    with postgres_cluster(bin_dir) as database:
        yield database


@pytest.mark.slow
def test_two_workers_share_one_postgres_study(work, postgres):
    storage = f"tune.storage={postgres('shared')}"
    workers = [start_worker(work, "postgres", storage, "tune.n_trials=1") for _ in range(2)]
    finish(*workers)
    assert_shared(config(work, "postgres", storage), workers=2, trials=2)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["journal", "postgres"])
def test_dead_worker_trial_is_failed_and_the_study_goes_on(work, kind, request):
    # The journal: the next worker on this host finds the dead process. PostgreSQL: Optuna's
    # heartbeat, stale after 2 x tune.heartbeat seconds, failed by the next worker's next trial.
    overrides = [f"tune.storage={request.getfixturevalue('postgres')('dead')}", "tune.heartbeat=1"] \
        if kind == "postgres" else []
    # Long enough trials (a few seconds) to catch one running; the epochs are part of the study's name, so the
    # worker, the check and the next run all use the same.
    overrides = [*overrides, "tune.epochs=30"]
    cfg = config(work, f"dead_{kind}", *overrides)
    worker = start_worker(work, f"dead_{kind}", *overrides)
    try:
        deadline = time.monotonic() + 120
        while not any(t.state == TrialState.RUNNING and "worker" in t.user_attrs for t in running_trials(cfg)):
            assert worker.poll() is None and time.monotonic() < deadline, worker.stderr.read()[-3000:]
            time.sleep(0.5)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.communicate()
    if kind == "postgres":
        time.sleep(2.5)  # past the grace period
    tune.main(config(work, f"dead_{kind}", *overrides, "tune.n_trials=1"))
    assert [t.state for t in trials_of(cfg)] == [TrialState.FAIL, TrialState.COMPLETE]


@pytest.mark.slow
def test_a_database_password_is_written_nowhere(tmp_path, postgres):
    """tune (URL in an environment variable, and given literally), train and the config printout, on a real
    PostgreSQL study: no file they write and no message they print holds the password."""
    from pipeline.layout import overrides_under

    password = "Pw-9f3kq2-never-written"
    url = postgres("secrets").replace("tuner@", f"tuner:{password}@")  # the server trusts loopback: any password
    work = tmp_path / "run"
    base = [sys.executable, "-m"]
    settings = ["--config", str(ROOT / "configs" / "smoke.yaml"), *overrides_under(work), *FAST, "train.folds=[0]"]
    printed = ""
    for command, storage, env in (
            ("pipeline.prepare", None, {}), ("pipeline.folds", None, {}),
            ("pipeline.tune", "env:OPTUNA_STORAGE", {"OPTUNA_STORAGE": url}),
            ("pipeline.tune", url, {}), ("pipeline.train", url, {}), ("pipeline.config", url, {})):
        extra = [f"tune.storage={storage}"] if storage else []
        result = subprocess.run([*base, command, *settings, *extra], capture_output=True, text=True,
                                env={**os.environ, **env}, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
        printed += result.stdout + result.stderr
    assert "tuner:***@" in printed and password not in printed
    written = [path for path in work.rglob("*") if path.is_file()]
    assert any(path.suffix == ".pt" for path in written)  # checkpoints hold the config: masked there too
    holding = [str(path) for path in written if password.encode() in path.read_bytes()]
    assert holding == []
    trials = pd.read_csv(work / "tuning" / BACKBONE / "trials.csv")
    assert len(trials) >= 2  # both tune runs used the database's study
