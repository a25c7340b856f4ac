"""Optuna's side of tuning: the storage a study lives in, the sampler and the pruner.

The default storage is a journal file that the processes of one box append to safely; a
database URL (PostgreSQL) serves workers on several machines, with Optuna's heartbeat to fail
the trials of a dead worker. A journal has no heartbeat, so a running trial whose worker process
on this host is gone is marked failed by the next worker. Passwords never reach a message.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import time
import warnings
from pathlib import Path

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from pipeline import layout
from pipeline.artifacts import process_alive
from pipeline.config import Config
from pipeline.errors import ConfigError, PipelineError


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def storage_target(cfg: Config) -> str:
    """``tune.storage`` (``env:NAME``: the URL in that environment variable), or by default the journal file
    shared by every backbone's study."""
    storage = cfg.tune.storage
    if storage and storage.startswith("env:"):
        name = storage.removeprefix("env:")
        if not os.environ.get(name):
            raise ConfigError(f"tune.storage is {storage!r}, but the environment variable {name} is not set: "
                              f"export {name}=postgresql://user:password@host:5432/db (or set tune.storage)")
        return os.environ[name]
    return storage or str(layout.optuna_journal(cfg))


def storage_label(cfg: Config) -> str:
    """The storage ``tune.storage`` names, as shown to the user: a database URL without its password."""
    target = storage_target(cfg)
    if "://" not in target:
        return target
    import sqlalchemy
    import sqlalchemy.exc

    try:
        return sqlalchemy.engine.make_url(target).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        raise ConfigError("tune.storage is not a valid database URL "
                          "(e.g. postgresql://user:password@host:5432/db)") from None


def open_storage(cfg: Config):
    """The storage ``tune.storage`` names: a database URL (RDBStorage with heartbeat) or a journal file.

    None means ``paths.tuning``/optuna.journal: a JournalStorage, which several processes append
    to safely (SQLite locks under concurrent writers). Raises PipelineError naming the storage,
    without its password, when it cannot be opened.
    """
    target = storage_target(cfg)
    if "://" not in target:
        if not target.endswith((".journal", ".log")):
            raise ConfigError(f"tune.storage {target!r} is neither a database URL (postgresql://user:password@host:"
                              f"5432/db, sqlite:///file.db) nor a journal file (*.journal or *.log)")
        try:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(target))
        except OSError as error:
            raise PipelineError(f"cannot open the Optuna journal {target}: {error.strerror}; "
                                f"check that its folder is writable") from None
    return _open_database(cfg, target)


def _open_database(cfg: Config, target: str):
    """RDBStorage on a database URL, with a heartbeat; errors name the storage without its password."""
    import sqlalchemy
    import sqlalchemy.exc

    shown = storage_label(cfg)
    url = sqlalchemy.engine.make_url(target)
    if url.drivername == "postgresql" and importlib.util.find_spec("psycopg") is None:
        # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the 'postgres' extra installs psycopg2.
        url = url.set(drivername="postgresql+psycopg2")
    engine_kwargs = {}
    if url.get_backend_name() == "postgresql":
        # A trial can keep a connection idle for hours: ping before use; fail fast on a dead host.
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            # A dead worker's trial stops sending heartbeats; after 2 x heartbeat seconds the next
            # worker to start a trial marks it failed. Plain fail, not a retry: a trial that killed
            # its worker (out of memory at a large batch size) would kill the next one too.
            for attempt in range(4):
                try:
                    return optuna.storages.RDBStorage(
                        url.render_as_string(hide_password=False), engine_kwargs=engine_kwargs,
                        heartbeat_interval=cfg.tune.heartbeat, heartbeat_stale_trial_callback=_report_stale)
                except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as error:
                    # Workers started together race to create Optuna's tables on an empty database;
                    # the loser sees a duplicate-key error. By the next try the tables exist.
                    if attempt == 3 or not any(word in str(error) for word in ("duplicate key", "already exists")):
                        raise
                    time.sleep(1.0 + attempt)
    except ImportError:
        raise ConfigError(f"tune.storage {shown} needs a database driver: pip install psycopg2-binary "
                          f"(the project's 'postgres' extra) for PostgreSQL") from None
    except sqlalchemy.exc.ArgumentError as error:
        raise ConfigError(f"tune.storage {shown}: {error} (e.g. postgresql://user:password@host:5432/db)") from None
    except sqlalchemy.exc.SQLAlchemyError as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        if url.password:
            reason = reason.replace(url.password, "***")
        raise PipelineError(f"cannot reach the Optuna storage {shown} ({reason}): check that the server runs and "
                            f"is reachable from this machine (host, port, firewall), that the database exists, and "
                            f"the user and password") from None


def _report_stale(study: optuna.Study, trial: FrozenTrial) -> None:
    print(f"[{study.study_name}] trial {trial.number} (worker {trial.user_attrs.get('worker', '?')}) sent no "
          f"heartbeat for a while: marked failed", file=sys.stderr)


def fail_orphaned_trials(study: optuna.Study) -> None:
    """Mark failed the running trials whose worker process on this host is gone.

    A journal file has no heartbeat, but its workers share a host (or a network folder): a
    running trial whose recorded worker is this host and a process id that no longer exists
    was left by a killed worker.
    """
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker_host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
        if worker_host == host and pid.isdigit() and not process_alive(int(pid)):
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            print(f"[{study.study_name}] trial {trial.number}: its worker (pid {pid}) is gone; marked failed",
                  file=sys.stderr)


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """Optuna's TPE, its random draws seeded from (seed, trial number).

    One seed per process would make workers started together draw the same random startup
    trials; the trial number is unique across workers, and the same for a re-run alone.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._tpe = optuna.samplers.TPESampler(seed=seed)

    def before_trial(self, study, trial):
        self._tpe = optuna.samplers.TPESampler(seed=self.seed + trial.number)
        self._tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values):
        self._tpe.after_trial(study, trial, state, values)

    def reseed_rng(self):
        self._tpe.reseed_rng()


def make_pruner(cfg: Config) -> optuna.pruners.BasePruner:
    steps = cfg.tune.epochs if len(cfg.tune.folds) == 1 else len(cfg.tune.folds)
    if cfg.tune.pruner == "median":
        # Optuna's 5 startup trials would leave a small study unpruned: the untuned first trial and
        # one sampled are enough for a median. The first step (warmup, or fold 0) is not judged.
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if cfg.tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=steps, reduction_factor=3)
    if cfg.tune.pruner == "wilcoxon":
        if len(cfg.tune.folds) == 1:
            print("tune: the wilcoxon pruner compares folds; with one tune.folds it compares epochs instead",
                  file=sys.stderr)
        return optuna.pruners.WilcoxonPruner(p_threshold=0.1, n_startup_steps=2)
    return optuna.pruners.NopPruner()
