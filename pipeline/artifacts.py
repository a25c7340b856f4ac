"""Atomic writing and checked reading of the files stages hand to each other.

Every writer goes through ``atomic_path``: the data goes to a temporary name in the same
folder and is renamed over the target only when complete, so a killed stage leaves the
previous file or none, never half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import DataError


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create folder {path.parent}: {error.strerror}") from None
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide outputs from other users of a shared box
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    except OSError as error:
        raise DataError(f"cannot write {path}: {error.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary folder beside ``path``; swap it in for ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(temporary, 0o755)
    try:
        yield temporary
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(temporary, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def write_json(path: str | Path, data) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as temporary:
        frame.to_csv(temporary, index=False)


def write_parquet(path: str | Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as temporary:
        frame.to_parquet(temporary, index=False)


def save_figure(path: str | Path, figure) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)


def read_json(path: str | Path, what: str = "file"):
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} {path} does not exist: run the stage that writes it first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{what} {path} is not valid JSON ({error}); delete it and re-run its stage") from None


def read_table(path: str | Path, what: str = "table") -> pd.DataFrame:
    """Read a CSV or Parquet artifact with an error naming the file and the stage to run."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} {path} does not exist: run the stage that writes it first")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except Exception as error:  # pyarrow and pandas raise many types for a damaged file
        raise DataError(f"{what} {path} cannot be read ({error}); delete it and re-run its stage") from None


def read_text_csv(path: str | Path, what: str, stage: str = "the stage that writes it") -> pd.DataFrame:
    """A CSV with every cell as the exact text in the file (ids like ``007`` stay ``007``)."""
    if not path.exists():
        raise DataError(f"{what} {path} does not exist: run {stage} first")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as error:  # pandas' parser and decoding errors are ValueErrors
        raise DataError(f"{what} {path} cannot be read ({error}); delete it and re-run {stage}") from None


def probability_table(ids, proba: np.ndarray, class_names: list[str], folds=None) -> pd.DataFrame:
    """The probability-table contract: id, (fold), one float column per class."""
    frame = pd.DataFrame({"id": list(ids)})
    if folds is not None:
        frame["fold"] = np.asarray(folds, dtype=int)
    for index, name in enumerate(class_names):
        frame[str(name)] = np.asarray(proba[:, index], dtype=np.float64)
    return frame
