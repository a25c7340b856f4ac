"""The kaggle CLI, wrapped: download a competition, upload, read back Kaggle's scores, push a code-competition package.

Every call goes through ``run``: no credential pre-check (the CLI knows every way it can log in: ``kaggle auth
login``, ``KAGGLE_API_TOKEN``, ``~/.kaggle/access_token``, ``kaggle.json``, ``KAGGLE_USERNAME``/``KAGGLE_KEY``), and a
missing CLI or an authentication failure becomes one ``PipelineError`` saying what to install and how to log in. What
the CLI prints is shown with every token it could hold replaced by ``[redacted]``.

``python -m pipeline.kaggle scores`` reads ``kaggle competitions submissions`` for ``submit.competition``, writes
Kaggle's Public and Private scores into the matching rows (by file name) of ``paths.submissions``/leaderboard.csv,
and redraws the CV-against-leaderboard plot (``paths.metrics``/cv_vs_lb.csv and cv_vs_lb.png).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import DataError, PipelineError

LOGIN_HELP = ("install the Kaggle CLI (pip install kaggle) and log in one of three ways: (1) `kaggle auth login` "
              "(in the browser); (2) an API token from kaggle.com > Settings > API, in the KAGGLE_API_TOKEN "
              "environment variable or saved as ~/.kaggle/access_token (or access_token.txt); (3) a legacy "
              "kaggle.json saved as ~/.kaggle/kaggle.json (chmod 600), or KAGGLE_USERNAME and KAGGLE_KEY")
# What a failed call prints when the CLI could not authenticate (no or a wrong token, an expired login).
AUTH_FAILURE = re.compile(r"\b401\b|unauthori[sz]ed|unauthenticated|credentials|could not find kaggle\.json|"
                          r"authenticat|access.?token|api.?token|not logged in|log ?in", re.IGNORECASE)
# Token shapes, redacted even when their value is not known here: Kaggle API tokens, 32-hex legacy keys.
TOKEN_SHAPES = re.compile(r"KGAT_[A-Za-z0-9_\-]+|\b[0-9a-f]{32}\b")
REDACTED = "[redacted]"
MARKER = ".kaggle-download.json"  # in a downloaded competition folder: what was downloaded, so it is done once
LB_COLUMNS = ("lb_public", "lb_private", "lb_status")


# ---------------------------------------------------------------- running the CLI without leaking a token

def config_dirs() -> list[Path]:
    """Where the kaggle CLI looks for its files (``KAGGLE_CONFIG_DIR``, ~/.kaggle, ~/.config/kaggle)."""
    folders = [Path(os.environ["KAGGLE_CONFIG_DIR"])] if os.environ.get("KAGGLE_CONFIG_DIR") else []
    return folders + [Path.home() / ".kaggle", Path.home() / ".config" / "kaggle"]


def secrets() -> list[str]:
    """Every token value this machine could hand the CLI: environment variables and the files it reads."""
    found = [os.environ.get(name, "") for name in ("KAGGLE_API_TOKEN", "KAGGLE_KEY")]
    for folder in config_dirs():
        for name in ("access_token", "access_token.txt"):
            try:
                found.append((folder / name).read_text().strip())
            except OSError:
                pass
        try:
            found.append(str(json.loads((folder / "kaggle.json").read_text()).get("key", "")))
        except (OSError, ValueError, AttributeError):
            pass
    return sorted({s for s in found if len(s) >= 4}, key=len, reverse=True)


def redact(text: str) -> str:
    """``text`` with every known token and every token-shaped word replaced by ``[redacted]``."""
    for secret in secrets():
        text = text.replace(secret, REDACTED)
    return TOKEN_SHAPES.sub(REDACTED, text)


def run(args: list[str], what: str, timeout: int = 600) -> str:
    """``kaggle args`` -> its stdout (redacted); a missing CLI, a failed login or any failure is one PipelineError."""
    executable = shutil.which("kaggle")
    if executable is None:
        raise PipelineError(f"{what}: the kaggle command is not on PATH. To use Kaggle, {LOGIN_HELP}")
    try:
        result = subprocess.run([executable, *args], check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PipelineError(f"{what}: `kaggle {' '.join(args[:2])}` did not finish in {timeout} s") from None
    output = redact((result.stderr or "") + (result.stdout or "")).strip()
    if result.returncode != 0:
        if AUTH_FAILURE.search(output):
            raise PipelineError(f"{what}: the kaggle CLI could not log in ({output[-300:]}). To fix it, {LOGIN_HELP}")
        hint = (" (a 403 from a competition: accept its rules on its kaggle.com page first)"
                if re.search(r"\b403\b", output) else "")
        raise PipelineError(f"{what}: `kaggle {' '.join(args[:2])}` failed (exit {result.returncode}): "
                            f"{output[-800:]}{hint}")
    return redact(result.stdout or "")


# ---------------------------------------------------------------- download

def download(competition: str, target: Path) -> Path:
    """``kaggle competitions download`` unzipped into ``target``, once: a folder with the marker is kept as it is."""
    from pipeline.artifacts import atomic_dir

    marker = target / MARKER
    if marker.exists() and json.loads(marker.read_text()).get("competition") == competition:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as scratch:
        run(["competitions", "download", "-c", competition, "-p", scratch, "-q"], f"downloading {competition}")
        archives = sorted(Path(scratch).glob("*.zip"))
        if not archives:
            raise DataError(f"`kaggle competitions download -c {competition}` wrote no zip file into {scratch}")
        with atomic_dir(target) as folder:
            for archive in archives:
                try:
                    with zipfile.ZipFile(archive) as bundle:
                        bundle.extractall(folder)
                except zipfile.BadZipFile:
                    raise DataError(f"{archive.name} from `kaggle competitions download -c {competition}` is not "
                                    f"a zip file") from None
            (folder / MARKER).write_text(json.dumps({"competition": competition}))
    print(f"kaggle: downloaded {competition} into {target}", file=sys.stderr)
    return target


def as_folder_competition(cfg):
    """``data.source: kaggle`` as the folder competition it becomes: ``data.competition`` downloaded (once) into
    ``<paths.competition>/<name>/``, and each of its files that is not where ``data.*`` says inferred."""
    from pipeline import layout

    folder = download(cfg.data.competition, layout.kaggle_competition_dir(cfg))
    keys = ["sample_submission", "test_images"] + (["train_csv"] if cfg.data.layout == "csv" else []) \
        + (["train_images"] if cfg.data.layout != "mask" else [])
    found = find_competition_files(folder, [key for key in keys if not (folder / getattr(cfg.data, key)).exists()])
    if found:
        print(f"kaggle: inferred from the download of {cfg.data.competition}: {found}", file=sys.stderr)
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": "folder", "dir": str(folder),
                                                                       **found})})


def find_competition_files(folder: Path, keys: list[str]) -> dict[str, str]:
    """The competition's files named by ``keys`` (of "train_csv", "sample_submission", "train_images",
    "test_images"), inferred, each relative to ``folder`` (a single wrapping folder is looked into). Whatever cannot
    be inferred is one DataError naming it and the ``data.*`` key that sets it."""
    root = folder
    entries = [p for p in folder.iterdir() if p.name != MARKER]
    if len(entries) == 1 and entries[0].is_dir():
        root = entries[0]
    csvs = sorted(p.name for p in root.glob("*.csv"))
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    sample = [n for n in csvs if "sample" in n.lower() or "submission" in n.lower()]
    train = [n for n in csvs if "train" in n.lower()] or [n for n in csvs if n not in sample and "test" not in n]
    train_images = [n for n in folders if n.lower().startswith("train")]
    test_images = [n for n in folders if n.lower().startswith("test")]
    found, missing = {}, []
    for key, candidates, what in (("train_csv", train, "the training table"),
                                  ("sample_submission", sample, "the sample submission"),
                                  ("train_images", train_images, "the training images' folder"),
                                  ("test_images", test_images, "the test images' folder")):
        if key not in keys:
            continue
        if len(candidates) == 1:
            found[key] = str((root / candidates[0]).relative_to(folder))
        else:
            missing.append(f"{what} (data.{key}): {'none of' if not candidates else 'several of'} "
                           f"{csvs if key in ('train_csv', 'sample_submission') else folders}")
    if missing:
        raise DataError(f"the downloaded competition {folder} does not show which file is which; set "
                        + "; ".join(missing))
    return found


# ---------------------------------------------------------------- Kaggle's scores beside CV

def submissions(competition: str) -> pd.DataFrame:
    """``kaggle competitions submissions -c NAME -v`` as a table: file, status, public, private (None: not scored)."""
    text = run(["competitions", "submissions", "-c", competition, "-v"], f"reading {competition}'s submissions")
    try:
        table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError):
        return pd.DataFrame(columns=["file", "status", "public", "private"])
    columns = {re.sub(r"[^a-z]", "", c.lower()): c for c in table.columns}
    missing = [c for c in ("filename", "publicscore") if c not in columns]
    if missing:
        raise DataError(f"`kaggle competitions submissions` printed columns {list(table.columns)}, without "
                        f"{missing}: is the kaggle CLI current (pip install -U kaggle)?")

    def score(name):
        return pd.to_numeric(table[columns[name]], errors="coerce") if name in columns else np.nan

    return pd.DataFrame({"file": table[columns["filename"]].str.strip(),
                         "status": table[columns["status"]] if "status" in columns else "",
                         "public": score("publicscore"), "private": score("privatescore")})


def record_scores(board: pd.DataFrame, scored: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The leaderboard with Kaggle's scores in its ``lb_*`` columns, matched by file name -> (board, rows matched).

    A file submitted twice takes its latest Kaggle row (the CLI lists the newest first)."""
    board = board.copy()
    for column in LB_COLUMNS:
        if column not in board.columns:
            board[column] = ""
    latest = scored.drop_duplicates("file", keep="first").set_index("file")
    matched = 0
    for index, name in board["file"].astype(str).items():
        if name in latest.index:
            row = latest.loc[name]
            board.loc[index, LB_COLUMNS] = [shown(row["public"]), shown(row["private"]), str(row["status"])]
            matched += 1
    return board, matched


def shown(value) -> str:
    return "" if pd.isna(value) else repr(float(value))


def cv_against_lb(board: pd.DataFrame) -> pd.DataFrame:
    """One row per submission: time, file, cv, lb_public (Kaggle's), local_public (solution.csv's), for the plot."""
    def number(column):
        return pd.to_numeric(board[column], errors="coerce") if column in board.columns else np.nan

    return pd.DataFrame({"time": board["time"], "file": board["file"], "cv": number("cv"),
                         "lb_public": number("lb_public"), "local_public": number("public")})


def plot_cv_against_lb(board: pd.DataFrame, csv_path: Path, png_path: Path, metric: str) -> pd.DataFrame:
    """Write the CV-against-Public table (a DVC plot) and its PNG: is the CV to be trusted?"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.artifacts import save_figure, write_csv

    table = cv_against_lb(board)
    write_csv(csv_path, table)
    figure, axis = plt.subplots(figsize=(5, 5))
    for column, label, marker in (("lb_public", "Kaggle Public LB", "o"), ("local_public", "local Public", "x")):
        rows = table[table[column].notna() & table["cv"].notna()]
        if len(rows):
            axis.scatter(rows["cv"], rows[column], marker=marker, label=f"{label} ({len(rows)})")
    values = table[["cv", "lb_public", "local_public"]].to_numpy(dtype=float)
    if np.isfinite(values).any():
        low, high = np.nanmin(values), np.nanmax(values)
        axis.plot([low, high], [low, high], color="grey", linewidth=0.8, label="LB = CV")
        axis.legend(loc="best", fontsize=8)
    axis.set_xlabel(f"CV {metric}")
    axis.set_ylabel(f"Public leaderboard {metric}")
    axis.set_title("CV against the Public leaderboard")
    save_figure(png_path, figure)
    return table


# ---------------------------------------------------------------- pushing a code-competition package

def push(dataset_dir: Path, kernel_dir: Path, message: str) -> None:
    """The dataset (a new version, or created when Kaggle has none of that id), then the kernel."""
    dataset_id = json.loads((dataset_dir / "dataset-metadata.json").read_text())["id"]
    try:
        run(["datasets", "status", dataset_id], f"looking up dataset {dataset_id}")
        exists = True
    except PipelineError as error:
        if "could not log in" in str(error) or "not on PATH" in str(error):
            raise
        exists = False
    if exists:
        run(["datasets", "version", "-p", str(dataset_dir), "-m", message, "--dir-mode", "zip"],
            f"uploading a new version of dataset {dataset_id}")
    else:
        run(["datasets", "create", "-p", str(dataset_dir), "--dir-mode", "zip"], f"creating dataset {dataset_id}")
    output = run(["kernels", "push", "-p", str(kernel_dir)], "pushing the inference kernel")
    print(f"kaggle: dataset {dataset_id} {'versioned' if exists else 'created'}; kernel pushed: {output.strip()}",
          file=sys.stderr)


# ---------------------------------------------------------------- python -m pipeline.kaggle scores

def main(cfg) -> dict:
    """Read back Kaggle's scores of ``submit.competition`` into the leaderboard and redraw the CV-against-LB plot."""
    from pipeline import layout
    from pipeline.artifacts import read_text_csv, write_csv
    from pipeline.errors import ConfigError

    if not cfg.submit.competition:
        raise ConfigError("submit.competition is not set: the competition's name in its URL, e.g. "
                          "submit.competition=titanic")
    path = layout.leaderboard_file(cfg)
    board = read_text_csv(path, "leaderboard", "submit")
    board, matched = record_scores(board, submissions(cfg.submit.competition))
    write_csv(path, board)
    plot_cv_against_lb(board, layout.cv_lb_table(cfg), layout.cv_lb_figure(cfg), cfg.metric)
    print(f"kaggle: Kaggle's scores written into {matched} of {len(board)} leaderboard rows ({path}); the plot: "
          f"{layout.cv_lb_figure(cfg)}", file=sys.stderr)
    return {"matched": matched, "rows": len(board)}


if __name__ == "__main__":
    from pipeline import cli

    if sys.argv[1:2] == ["scores"]:
        sys.argv.pop(1)
    cli.run(main, "Read Kaggle's scores of the uploaded submissions into the leaderboard; plot CV against LB.")
