"""Stage tune: an Optuna study per backbone over the training hyperparameters.

Reads:  ``paths.cache`` (images), ``paths.folds``, and the study in ``tune.storage``
        (default ``paths.tuning``/optuna.journal, one study per backbone, named after it).
Writes: the trials into that storage, and ``paths.tuning``/<backbone>/ with
        best_params.yaml (the best trial's ``train.*`` values; train applies them when
        ``train.use_tuned``) and trials.csv (every trial: number, state, value, params, worker);
        Optuna's PNG plots (history, importances, parallel, intermediate) in
        ``paths.plots``/tuning/<backbone>/, where ``dvc plots show`` finds them.

A trial is the config with the trial's ``tune.space`` values, trained by train's own
``cross_validate`` on ``tune.folds`` for ``tune.epochs`` epochs; its value is the mean of the
folds' best ``metric``. It reports every epoch (one fold) or every fold (several: what
the Wilcoxon pruner is made for), so ``tune.pruner`` stops hopeless trials early. A new
study's first trial is the untuned config, and best_params.yaml keeps the untuned values unless
the best trial beats that trial by at least ``tune.min_gain``: with a few short trials on one
fold, the maximum of several noisy scores beats the baseline by chance (the winner's curse), and
a lucky short run is no evidence that the full-length training will gain.

The study lives in the storage: a re-run adds ``tune.n_trials`` trials (or runs until
``tune.timeout``), and any number of workers started at once join the same study. The default
journal file serves the processes of one box; a PostgreSQL URL serves workers on several
machines. A worker that dies leaves its trial failed, not running forever: Optuna's heartbeat
does it for a database, a check of the worker's process on this host for a journal file.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import optuna
import torch
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages.journal import JournalStorage
from optuna.trial import FrozenTrial, TrialState
from pydantic import ValidationError

from pipeline import cli, layout, metrics, provenance
from pipeline.artifacts import atomic_dir, save_figure, write_csv, write_text
from pipeline.config import Config, Train
from pipeline.errors import ConfigError, PipelineError
from pipeline.training.devices import resolve_devices, run_on_devices
from pipeline.training.fold_setup import check_choices
from pipeline.training.kfold import TrainingData, cross_validate, load_training_data, settings_key
from pipeline.training.studies import (
    TrialSeededTPE,
    fail_orphaned_trials,
    make_pruner,
    open_storage,
    storage_label,
    worker_name,
)

# The user attribute that marks a study's first trial, the untuned config, which min_gain compares against.
UNTUNED_ORIGIN = "untuned config"


class TrialFailed(Exception):
    """A trial that training rejected (a NaN loss, out of GPU memory): the study marks it failed and goes on."""


# ---------------------------------------------------------------- the search space

def search_space(cfg: Config) -> dict[str, BaseDistribution]:
    """``tune.space`` as Optuna distributions; every name, bound and choice checked against train's config."""
    valid = list(Train.model_fields)
    space = {}
    for name, param in cfg.tune.space.items():
        where = f"tune.space.{name}"
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: train has no key {name!r}{hint} (valid: {', '.join(valid)})")
        if name == "epochs":
            raise ConfigError(f"{where}: a trial's budget is tune.epochs; compare budgets by separate studies")
        try:
            if param.type == "categorical":
                distribution = CategoricalDistribution(param.choices)
            elif param.type == "int":
                if not all(float(v).is_integer() for v in (param.low, param.high, param.step or 1)):
                    raise ValueError(f"an int parameter needs integer low, high and step (got {param.low}, "
                                     f"{param.high}, {param.step})")
                distribution = IntDistribution(int(param.low), int(param.high), log=param.log,
                                               step=int(param.step or 1))
            else:
                distribution = FloatDistribution(param.low, param.high, log=param.log, step=param.step)
        except ValueError as error:
            raise ConfigError(f"{where}: {error}") from None
        bounds = distribution.choices if param.type == "categorical" else (distribution.low, distribution.high)
        for value in bounds:
            try:
                check_choices(cfg.with_train({name: value}))
            except ValidationError as error:
                reason = error.errors()[0]["msg"].removeprefix("Value error, ")
                raise ConfigError(f"{where}: {value!r} is not a valid train.{name} ({reason})") from None
            except ConfigError as error:
                raise ConfigError(f"{where}: {error}") from None
        space[name] = distribution
    return space


def suggest(trial: optuna.Trial, name: str, distribution: BaseDistribution):
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, step=distribution.step,
                                 log=distribution.log)
    return trial.suggest_float(name, distribution.low, distribution.high, step=distribution.step,
                               log=distribution.log)


def untuned_values(cfg: Config, space: dict[str, BaseDistribution]) -> dict:
    """The config's own values of the space's parameters, those inside the space (the first trial of a study)."""
    values = {}
    for name, distribution in space.items():
        value = getattr(cfg.train, name)
        if isinstance(distribution, CategoricalDistribution):
            inside = value in distribution.choices
        else:
            inside = isinstance(value, (int, float)) and distribution.low <= value <= distribution.high
        if inside:
            values[name] = value
    return values


# ---------------------------------------------------------------- storage, sampler, pruner

def study_name(cfg: Config, backbone: str, data: TrainingData) -> str:
    """The study's name in the storage: the backbone and a digest of everything its trials depend on.

    That is the fold settings key (train settings, including the searched keys' own values that the
    untuned trial uses, runtime, metric, images, folds, labels, training code), the search's own settings
    and tune's code. A changed setting therefore opens a fresh study with a fresh untuned trial, never
    mixing old and new trials; workers with the same settings compute the same name and join one study.
    """
    search = cfg.tune.model_dump(include={"epochs", "folds", "max_train", "space", "pruner", "seed"})
    digest = hashlib.sha256(json.dumps([settings_key(cfg, backbone, data, -1), search,
                                        provenance.training_code_digest("tune")], sort_keys=True, default=str).encode())
    return f"{backbone}-{digest.hexdigest()[:10]}"


def open_study(cfg: Config, backbone: str, storage=None, data: TrainingData | None = None) -> optuna.Study:
    """The backbone's study for these settings: joined when it exists, else created with the untuned config
    queued first."""
    storage = storage if storage is not None else open_storage(cfg)
    name = study_name(cfg, backbone, data if data is not None else load_training_data(cfg))
    direction = "maximize" if metrics.greater_is_better(cfg.metric) else "minimize"
    sampler, pruner = TrialSeededTPE(cfg.tune.seed), make_pruner(cfg)
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction=direction, sampler=sampler,
                                    pruner=pruner)
    except optuna.exceptions.DuplicatedStudyError:  # another run or worker made it: join
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    study.set_user_attr("metric", cfg.metric)
    study.enqueue_trial(untuned_values(cfg, search_space(cfg)), user_attrs={"origin": UNTUNED_ORIGIN})
    return study


# ---------------------------------------------------------------- the objective

def make_objective(cfg: Config, backbone: str, data: TrainingData, space: dict[str, BaseDistribution],
                   device: str | None = None):
    """objective(trial) -> the mean over ``tune.folds`` of each fold's best ``metric``, trained on ``device``
    (None: ``runtime.device``)."""
    one_fold = len(cfg.tune.folds) == 1

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker_name())
        values = {name: suggest(trial, name, distribution) for name, distribution in space.items()}
        try:
            trial_cfg = cfg.with_train(values)
        except ValidationError as error:
            raise ConfigError(f"tune.space: trial {trial.number}'s values {values} make an invalid train config: "
                              f"{error.errors()[0]['msg']}") from None

        def report(step: int, score: float) -> None:
            trial.report(score, step)
            if trial.should_prune():
                raise optuna.TrialPruned()

        try:
            results = cross_validate(
                trial_cfg, backbone, data, out_dir=None, folds=cfg.tune.folds, epochs=cfg.tune.epochs,
                train_subset=cfg.tune.max_train, on_fold=None if one_fold else report,
                on_epoch=(lambda fold, epoch, score: report(epoch, score)) if one_fold else None,
                devices=[device] if device else None)
        except ConfigError:
            raise  # a config bug, not a bad trial: stop
        except (PipelineError, torch.cuda.OutOfMemoryError) as error:
            trial.set_user_attr("error", str(error)[:500])
            raise TrialFailed(str(error)) from error
        return float(np.mean([result.best_score for result in results]))

    return objective


def progress(cfg: Config, backbone: str, orphan_check: bool):
    """The after-trial callback: one line per trial with the best so far (all workers' trials)."""
    unit = "epoch" if len(cfg.tune.folds) == 1 else "fold"

    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
        if trial.state == TrialState.COMPLETE:
            outcome = f"{cfg.metric} {trial.value:.4f}"
        elif trial.state == TrialState.PRUNED:
            outcome = f"pruned at {unit} {(trial.last_step or 0) + 1}"
        else:
            outcome = f"failed: {trial.user_attrs.get('error', 'see the error above')}"
        try:
            best = f"best {study.best_value:.4f} (trial {study.best_trial.number})"
        except ValueError:
            best = "no completed trial yet"
        print(f"[{backbone}] trial {trial.number} {params}: {outcome}; {best}", file=sys.stderr)
        if orphan_check:
            fail_orphaned_trials(study)

    return callback


# ---------------------------------------------------------------- outputs

UNTUNED_PLOT = "no_search.png"  # the plots folder's one figure when the search is off
PLOTS = {  # file -> (Optuna's matplotlib plot, completed trials it needs)
    "history.png": ("plot_optimization_history", 1),
    "importances.png": ("plot_param_importances", 2),
    "parallel.png": ("plot_parallel_coordinate", 1),
    "intermediate.png": ("plot_intermediate_values", 0),
}


def save_plots(folder: Path, study: optuna.Study, backbone: str) -> list[str]:
    """The PNGs Optuna can draw for this study, in ``folder`` (swapped in whole: no plot of an earlier run
    outlives it); a plot it cannot draw is skipped with a note."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    completed = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    saved = []
    with atomic_dir(folder) as temporary:
        for file_name, (function, needed) in PLOTS.items():
            if completed < needed:
                print(f"[{backbone}] {file_name} skipped: it needs {needed} completed trial(s), the study has "
                      f"{completed}", file=sys.stderr)
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    axes = getattr(optuna_plots, function)(study)
            except Exception as error:  # Optuna raises several types on a study it cannot draw
                plt.close("all")
                print(f"[{backbone}] {file_name} skipped: {type(error).__name__}: {error}", file=sys.stderr)
                continue
            save_figure(temporary / file_name, np.ravel(axes)[0].figure)
            saved.append(file_name)
    return saved


def chosen_trial(cfg: Config, study: optuna.Study) -> tuple[FrozenTrial | None, str]:
    """The trial whose values go into best_params.yaml, and why.

    The best trial, unless the study's untuned-config trial is complete and the best beats it by
    less than ``tune.min_gain`` (in the metric's own direction): then the untuned trial.
    """
    try:
        best = study.best_trial
    except ValueError:  # every trial pruned or failed
        return None, "no completed trial"
    untuned = [trial for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
               if trial.user_attrs.get("origin") == UNTUNED_ORIGIN]
    if not untuned or best.number == untuned[0].number:
        return best, "best"
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
    gain = sign * (best.value - untuned[0].value)
    if gain < cfg.tune.min_gain:
        return untuned[0], (f"untuned config kept: the best, trial {best.number} ({best.value:.4f}), gains only "
                            f"{gain:+.4f} < tune.min_gain {cfg.tune.min_gain}")
    return best, f"best (gains {gain:+.4f} over the untuned config)"


def write_outputs(cfg: Config, backbone: str, study: optuna.Study) -> dict:
    """best_params.yaml, trials.csv and the plots of the study as it stands (every worker's trials)."""
    folder = layout.tuning_dir(cfg, backbone)
    trials = study.trials_dataframe(attrs=("number", "state", "value", "params", "user_attrs", "datetime_start",
                                           "duration"))
    write_csv(folder / "trials.csv", trials)
    states = [trial.state for trial in study.get_trials(deepcopy=False)]
    best, note = chosen_trial(cfg, study)
    best_params = layout.best_params_file(cfg, backbone)
    write_text(best_params, yaml.safe_dump(dict(best.params) if best else {}, sort_keys=False))
    plots = save_plots(layout.tuning_plots_dir(cfg, backbone), study, backbone)
    summary = {"trials": len(states), **{state.name.lower(): states.count(state) for state in
                                         (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)},
               "best_value": best.value if best else None, "best_trial": best.number if best else None,
               "best_params": dict(best.params) if best else {}, "plots": plots}  # best: the chosen trial
    outcome = (f"{note}: trial {best.number} ({cfg.metric} {best.value:.4f}) in {best_params}"
               if best else "no completed trial: best_params.yaml is empty, train uses its own values")
    print(f"[{backbone}] {summary['trials']} trials ({summary['complete']} complete, {summary['pruned']} pruned, "
          f"{summary['fail']} failed); {outcome}", file=sys.stderr)
    return summary


def write_untuned(cfg: Config, backbone: str) -> dict:
    """Tuning off: an empty best_params.yaml (DVC still gets its output; train uses its own values) and, in the plots
    folder, one figure that says so (``dvc plots show`` shows why there is no study; DVC warns on an empty folder)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_text(layout.best_params_file(cfg, backbone), "{}\n")
    figure, axes = plt.subplots(figsize=(6, 1.2))
    axes.axis("off")
    own = cfg.for_backbone(backbone).train
    axes.text(0.5, 0.5, f"{backbone}: no search (tune.enabled false or tune.n_trials 0)\ntrain uses its configured "
              f"settings: lr {own.lr:g}, batch {own.batch_size}, {own.epochs} epochs", ha="center", va="center")
    with atomic_dir(layout.tuning_plots_dir(cfg, backbone)) as temporary:
        save_figure(temporary / UNTUNED_PLOT, figure)
    print(f"[{backbone}] tuning is off (tune.enabled false or tune.n_trials 0): empty best_params.yaml",
          file=sys.stderr)
    return {"trials": 0, "best_params": {}}


# ---------------------------------------------------------------- one backbone, then all

def tune_backbone(cfg: Config, backbone: str, storage, data: TrainingData, space: dict,
                  devices: list[str]) -> dict:
    """Add ``tune.n_trials`` trials to the backbone's study, shared among ``devices`` (one worker process each,
    joining the one study in the storage, when there are several), then write the outputs."""
    cfg = cfg.for_backbone(backbone)  # the search starts from this backbone's own overrides
    study = open_study(cfg, backbone, storage, data)
    if isinstance(storage, JournalStorage):
        fail_orphaned_trials(study)
    finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)))
    budget = f"{cfg.tune.n_trials} more trial(s)" + (f" or {cfg.tune.timeout:g}s" if cfg.tune.timeout else "")
    print(f"[{backbone}] tuning {', '.join(space)} in study {study.study_name!r} of {storage_label(cfg)} "
          f"({finished} trials so far): {budget}, {cfg.tune.epochs} epoch(s) on fold(s) {cfg.tune.folds}, "
          f"{cfg.tune.pruner} pruner, worker {worker_name()}", file=sys.stderr)
    if len(devices) > 1:
        shares = [len(range(index, cfg.tune.n_trials, len(devices))) for index in range(len(devices))]
        run_on_devices(search_job, [(cfg, backbone, share) for share in shares if share], devices,
                       f"[{backbone}] tuning")
    else:
        search(study, cfg, backbone, data, space, devices[0] if devices else None, cfg.tune.n_trials, storage)
    return write_outputs(cfg, backbone, study)


def search(study: optuna.Study, cfg: Config, backbone: str, data: TrainingData, space: dict, device: str | None,
           n_trials: int, storage) -> None:
    """``n_trials`` trials of the study (or until ``tune.timeout``) by this process, on ``device``."""
    study.optimize(make_objective(cfg, backbone, data, space, device), n_trials=n_trials, timeout=cfg.tune.timeout,
                   catch=(TrialFailed,), callbacks=[progress(cfg, backbone, isinstance(storage, JournalStorage))],
                   gc_after_trial=True)


def search_job(device: str, cfg: Config, backbone: str, n_trials: int) -> None:
    """A device worker's share of the trials: it opens the storage and joins the study itself."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage, data = open_storage(cfg), load_training_data(cfg)
    search(open_study(cfg, backbone, storage, data), cfg, backbone, data, search_space(cfg), device, n_trials,
           storage)


def main(cfg: Config, backbone: str | None = None) -> dict:
    names = [backbone] if backbone else list(cfg.backbones)
    check_choices(cfg)
    space = search_space(cfg)
    if not cfg.tune.enabled or cfg.tune.n_trials == 0:
        return {name: write_untuned(cfg, name) for name in names}
    # Our line per trial replaces Optuna's INFO lines and its per-trial warnings, which repeat a failed
    # trial's message with a traceback.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = open_storage(cfg)
    data = load_training_data(cfg)
    missing = sorted(set(cfg.tune.folds) - set(np.unique(data.folds).tolist()))
    if missing:
        raise ConfigError(f"tune.folds {missing} are not folds of {layout.folds_file(cfg)} "
                          f"(it has {sorted(np.unique(data.folds).tolist())})")
    devices = resolve_devices(cfg.train.devices, cfg.runtime.device)
    return {name: tune_backbone(cfg, name, storage, data, space, devices) for name in names}


if __name__ == "__main__":
    cli.run(main, "Optuna search of each backbone's training hyperparameters.", backbone_option=True)
