"""Stage submit: write the competition CSV from the ensemble and score it like the leaderboard.

Reads:  ``paths.ensemble``/ test.parquet, weights.json; ``paths.metrics``/ensemble.json (method, CV);
        ``paths.cache``/ meta.json and sample_submission.csv; ``paths.cache``/solution.csv when the
        competition has hidden labels (read here only, for scoring: no stage that makes a choice ever sees it).
Writes: ``paths.submissions``/ <UTC YYYYmmdd-HHMMSS>_<method>_cv<score>.csv (every submission is
        kept), submission.csv (the latest), leaderboard.csv (one row per submission: time, file,
        method, members, metric, cv, public, private, and where it came from: commit (short sha,
        ``+dirty``), DVC experiment, config digest); ``paths.metrics``/submission.json (cv, public,
        private: DVC metrics, outside the kept-submissions folder DVC persists). Both folders are at
        the repository's top level, tracked by git.

The CSV has exactly the sample submission's shape: its columns in its order, its ids as its text
in its row order, other columns untouched; the target column holds the argmax class name
(``submit.kind: label``) or each class column its probability (``submit.kind: proba``). It is
validated before anything is written. Where solution.csv exists, the file is scored the way
Kaggle scores it: ``metric`` on the Public rows and on the Private rows, printed beside
the CV so a CV/leaderboard gap shows at once. ``submit.upload`` then sends it with the kaggle CLI
(``pipeline.kaggle``; a code competition's package instead) and reads Kaggle's scores back into leaderboard.csv;
``paths.metrics``/cv_vs_lb.csv and .png draw every submission's CV against its Public score.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import cli, kaggle, layout, metrics, provenance
from pipeline.artifacts import read_json, read_table, read_text_csv, write_csv, write_json
from pipeline.config import Config
from pipeline.data.competition import encode_labels
from pipeline.data.images import Cache
from pipeline.data.stage_tables import check_same_ids, describe_ids
from pipeline.errors import ConfigError, DataError
from pipeline.layout import slug

# ---------------------------------------------------------------- building and checking the CSV

def value_columns(sample: pd.DataFrame, class_names: list[str], kind: str, target_col: str) -> list[str]:
    """The sample's columns this stage fills: the target column, or one column per class."""
    if kind == "label":
        if target_col not in sample.columns:
            raise DataError(f"the sample submission has no target column {target_col!r}; its columns are "
                            f"{list(sample.columns)}: re-run prepare")
        return [target_col]
    missing = [c for c in class_names if c not in sample.columns]
    if missing:
        raise ConfigError(f"submit.kind is 'proba' but the sample submission has no column for class(es) "
                          f"{missing} (its columns are {list(sample.columns)}); proba needs one column per class. "
                          f"For a sample with one label column use submit.kind=label")
    return list(class_names)


def build_submission(sample: pd.DataFrame, proba: np.ndarray, class_names: list[str], kind: str,
                     target_col: str) -> pd.DataFrame:
    """The sample submission with its prediction column(s) filled from ``proba`` (N x C, sample row order)."""
    submission = sample.copy()
    if kind == "label":
        # argmax would turn a NaN row into class 0; leave it empty so validation names it instead.
        finite = np.isfinite(proba).all(axis=1)
        submission[target_col] = [class_names[i] if ok else np.nan
                                  for i, ok in zip(metrics.predict_labels(proba), finite)]
    else:
        for index, name in enumerate(class_names):
            submission[name] = proba[:, index]
    return submission


def validate_submission(submission: pd.DataFrame, sample: pd.DataFrame, class_names: list[str], kind: str,
                        id_col: str | None = None, target_col: str | None = None) -> list[str]:
    """Every problem of a submission against its sample (empty list: it is fine to send).

    Checks the columns and their order, every sample id present exactly once and in the sample's
    order, no extra id, no empty value, and every label a known class (``kind`` label) or every
    probability in [0, 1] (``kind`` proba). ``id_col``/``target_col`` default to the sample's first
    and second columns. Each problem names the offending ids (the first 10 and a count).
    """
    id_col = id_col or sample.columns[0]
    target_col = target_col or sample.columns[1]
    problems = []
    if list(submission.columns) != list(sample.columns):
        problems.append(f"columns {list(submission.columns)} are not the sample submission's {list(sample.columns)}")
    if id_col not in submission.columns:
        return problems + [f"no id column {id_col!r}"]
    ids = submission[id_col]
    if ids.isna().any():
        problems.append(f"empty id on row(s) {np.flatnonzero(ids.isna())[:10].tolist()}")
    ids = ids[ids.notna()].astype(str)
    sample_ids = sample[id_col].astype(str)
    present, expected = set(ids), set(sample_ids)
    duplicated = ids[ids.duplicated()].unique()
    if len(duplicated):
        problems.append(f"duplicate {describe_ids(duplicated)}")
    missing = [i for i in sample_ids if i not in present]
    if missing:
        problems.append(f"missing {describe_ids(missing)} of the sample submission")
    extra = [i for i in ids if i not in expected]
    if extra:
        problems.append(f"{describe_ids(extra)} not in the sample submission")
    if not problems and ids.tolist() != sample_ids.tolist():
        row = int(np.flatnonzero(ids.to_numpy() != sample_ids.to_numpy())[0])
        problems.append(f"ids are not in the sample submission's order: row {row} holds {ids.iloc[row]}, "
                        f"the sample has {sample_ids.iloc[row]}")
    columns = [target_col] if kind == "label" else [c for c in class_names if c in submission.columns]
    columns = [c for c in columns if c in submission.columns]
    row_ids = submission[id_col].astype(str)
    empty = submission[columns].isna().any(axis=1)
    if empty.any():
        problems.append(f"empty (NaN) prediction for {describe_ids(row_ids[empty])}")
    if kind == "label" and target_col in submission.columns:
        unknown = submission[target_col].notna() & ~submission[target_col].astype(str).isin(class_names)
        if unknown.any():
            labels = sorted(submission.loc[unknown, target_col].astype(str).unique())[:10]
            problems.append(f"label(s) {labels} are not among the classes {class_names}, for "
                            f"{describe_ids(row_ids[unknown])}")
    elif kind == "proba" and columns:
        values = submission[columns].apply(pd.to_numeric, errors="coerce")
        outside = (values.isna() & submission[columns].notna()).any(axis=1) | (values < 0).any(axis=1) \
            | (values > 1).any(axis=1)
        if outside.any():
            problems.append(f"probabilities that are not numbers in [0, 1] for {describe_ids(row_ids[outside])}")
    return problems


# ---------------------------------------------------------------- scoring like the leaderboard

def leaderboard_scores(submission: pd.DataFrame, solution: pd.DataFrame, class_names: list[str], kind: str,
                       metric: str, id_col: str, target_col: str) -> dict:
    """Kaggle's {"public", "private"}: ``metric`` on the solution rows of each Usage (None when it has none).

    A label submission is scored as one-hot probabilities of its labels, a proba submission by its
    class columns. A solution without a Usage column counts wholly as Public.
    """
    for column in (id_col, target_col):
        if column not in solution.columns:
            raise DataError(f"the solution has no column {column!r}; its columns are {list(solution.columns)}")
    solution_ids = solution[id_col].astype(str)
    rows = submission.assign(**{id_col: submission[id_col].astype(str)}).set_index(id_col)
    unscored = sorted(set(solution_ids) - set(rows.index))
    if unscored:
        raise DataError(f"the solution holds {describe_ids(unscored)} that the submission does not")
    rows = rows.loc[solution_ids]
    if kind == "label":
        proba = np.eye(len(class_names))[encode_labels(rows[target_col], class_names, "the submission")]
    else:
        proba = rows[class_names].to_numpy(dtype=float)
    y_true = encode_labels(solution[target_col], class_names, "the solution")
    usage = (solution["Usage"].str.strip().str.lower() if "Usage" in solution.columns
             else pd.Series("public", index=solution.index))
    scores = {}
    for split in ("public", "private"):
        chosen = (usage == split).to_numpy()
        scores[split] = metrics.score(metric, y_true[chosen], proba[chosen]) if chosen.any() else None
    return scores


# ---------------------------------------------------------------- files and upload

def keep_submission(cfg: Config, submission: pd.DataFrame, method: str, cv: float) -> tuple[Path, datetime]:
    """Write the timestamped copy and submission.csv (the latest); a name already taken gets a suffix."""
    folder = layout.submissions_dir(cfg)
    now = datetime.now(timezone.utc)
    stem = f"{now:%Y%m%d-%H%M%S}_{slug(method)}_cv{cv:.4f}"
    path, count = folder / f"{stem}.csv", 1
    while path.exists():
        count += 1
        path = folder / f"{stem}-{count}.csv"
    write_csv(path, submission)
    write_csv(layout.latest_submission_file(cfg), submission)
    return path, now


def append_leaderboard(path: Path, row: dict) -> pd.DataFrame:
    """Read, append, write whole (atomically): a killed run leaves the old board, never half a row.

    Earlier rows are read as text and written back as they were (a sha like ``1e34567`` stays text)."""
    board = pd.DataFrame([row])
    if path.exists():
        board = pd.concat([read_text_csv(path, "leaderboard"), board], ignore_index=True)
    write_csv(path, board)
    return board


def upload_message(message: str, row: dict) -> str:
    """The Kaggle submission message: ``submit.message``, then the leaderboard row's method, CV and provenance."""
    parts = [message, f"{row['method']} cv {row['cv']:.4f}", f"commit {row['commit'] or 'none'}"]
    if row["experiment"]:
        parts.append(f"exp {row['experiment']}")
    return " | ".join([*parts, f"config {row['config']}"])


def upload(cfg: Config, path: Path, message: str) -> None:
    """Send the submission with the kaggle CLI (``kaggle competitions submit -c ... -f ... -m message``), or on a
    code competition push the package ``pipeline.kaggle_package`` wrote; then read Kaggle's scores back into the
    leaderboard. A missing CLI or login is one PipelineError (``pipeline.kaggle.run``) naming what and how."""
    if not cfg.submit.competition:
        raise ConfigError(f"submit.upload is on but submit.competition is not set (the competition's name in its "
                          f"URL, e.g. submit.competition=titanic). The local submission is written: {path}")
    where = f"submit.upload (the local submission is written: {path})"
    if cfg.submit.code_competition:
        package = layout.kaggle_package_dir(cfg)
        if not (package / "kernel" / "kernel-metadata.json").exists():
            raise DataError(f"submit.code_competition is on but {package} holds no package: run "
                            f"python -m pipeline.kaggle_package first. The local submission is written: {path}")
        kaggle.push(package / "dataset", package / "kernel", message)
    else:
        output = kaggle.run(["competitions", "submit", "-c", cfg.submit.competition, "-f", str(path), "-m", message],
                            where)
        print(f"submit: uploaded to {cfg.submit.competition}: {output.strip()}", file=sys.stderr)
    kaggle.main(cfg)


def record_paths(cfg: Config) -> list[Path]:
    """What a run rewrites among git's files (left out of the commit's dirty check): dvc.lock, metrics, submissions."""
    return [Path("dvc.lock"), layout.metrics_dir(cfg), layout.submissions_dir(cfg)]


def read_ensemble_test(cfg: Config, cache: Cache, sample_ids: list[str], sample_path: Path) -> np.ndarray:
    """The ensemble's test probabilities, aligned by id to the sample submission's rows -> N x C."""
    path = layout.ensemble_dir(cfg) / layout.ENSEMBLE_TEST
    test = read_table(path, "ensemble test predictions", "the ensemble stage")
    test["id"] = test["id"].astype(str)
    columns = [str(c) for c in test.columns if c != "id"]
    if sorted(columns) != sorted(cache.class_names):
        raise DataError(f"{path} has class columns {columns} but {cache.folder / layout.CACHE_META} has "
                        f"{cache.class_names}: re-run ensemble")
    check_same_ids(test["id"], sample_ids, path, sample_path, "re-run ensemble (it predates the current image cache)")
    return test.set_index("id").loc[sample_ids, list(cache.class_names)].to_numpy(dtype=float)


# ---------------------------------------------------------------- the stage

def main(cfg: Config) -> dict:
    cache = Cache.open(cfg)
    class_names, id_col, target_col = list(cache.class_names), cache.meta["id_col"], cache.meta["target_col"]
    kind, metric = cfg.submit.kind, cfg.metric
    sample_path = cache.folder / layout.CACHE_SAMPLE_SUBMISSION
    sample = read_text_csv(sample_path, "sample submission", "prepare")
    value_columns(sample, class_names, kind, target_col)
    ensemble = layout.ensemble_dir(cfg)
    ensemble_scores = read_json(layout.ensemble_scores_file(cfg), "ensemble scores", "the ensemble stage")
    weights = read_json(ensemble / layout.ENSEMBLE_WEIGHTS, "ensemble weights", "the ensemble stage")
    members = weights["members"]
    if weights.get("metric") != metric:
        raise DataError(f"the ensemble was scored with {weights.get('metric')} but the config's metric is "
                        f"{metric}: re-run ensemble")
    method, cv = weights["method"], float(ensemble_scores["ensemble_cv"])

    proba = read_ensemble_test(cfg, cache, sample[id_col].tolist(), sample_path)
    submission = build_submission(sample, proba, class_names, kind, target_col)
    problems = validate_submission(submission, sample, class_names, kind, id_col, target_col)
    if problems:
        raise DataError("the submission is not valid, nothing was written:\n  " + "\n  ".join(problems))
    path, now = keep_submission(cfg, submission, method, cv)

    solution_path = cache.folder / layout.CACHE_SOLUTION
    scores = {"public": None, "private": None}
    if solution_path.exists():
        solution = read_text_csv(solution_path, "solution", "prepare")
        scores = leaderboard_scores(submission, solution, class_names, kind, metric, id_col, target_col)
    row = {"time": f"{now:%Y-%m-%dT%H:%M:%SZ}", "file": path.name, "method": method, "members": "+".join(members),
           "metric": metric, "cv": cv, **scores, **provenance.run_provenance(cfg, record_paths(cfg))}
    board = append_leaderboard(layout.leaderboard_file(cfg), row)
    kaggle.plot_cv_against_lb(board, layout.cv_lb_table(cfg), layout.cv_lb_figure(cfg), metric)
    result = {"cv": cv, **scores, "method": method, "metric": metric}
    write_json(layout.submission_metrics_file(cfg), metrics.numbers_only(result))

    def shown(value):
        return "n/a (no solution.csv)" if value is None else f"{value:.4f}"

    print(f"submit: wrote {path} ({len(submission)} rows, kind {kind}) and submission.csv\n"
          f"  {metric}: CV {cv:.4f} | Public {shown(scores['public'])} | Private {shown(scores['private'])}\n"
          f"leaderboard (last 5):\n{board.tail(5).to_string(index=False)}", file=sys.stderr)
    if cfg.submit.upload:
        upload(cfg, path, upload_message(cfg.submit.message, row))
    return {**result, "file": str(path)}


if __name__ == "__main__":
    cli.run(main, "Write the submission CSV, validate it, and score it like the leaderboard.")
