"""Atomic writing and checked reading of the files stages hand to each other.

Every writer goes through ``atomic_path``: the data goes to a temporary name in the same
folder and is renamed over the target only when complete, so a killed stage leaves the
previous file or none, never half a file. A write that fails (a full disk, a read-only
folder) raises a ``DataError`` naming the file and what to do, and leaves the previous file
as it was; what a killed writer left behind is removed by the next writer of that path.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import DataError

# A write that fails says why and what to do; errno groups the causes a user can act on.
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}
_NOT_A_FOLDER = {errno.ENOTDIR, errno.EEXIST}


def _advice(error: OSError) -> tuple[str, str]:
    """(the likely cause, what to do) for a failed write."""
    if error.errno in _NO_ROOM:
        return ("disk full, or a quota or file-size limit reached",
                "free space or set paths.work_dir to a disk with room")
    if error.errno in _NOT_WRITABLE:
        return "the folder is read-only or not yours", "make it writable or set paths.work_dir to a writable folder"
    if error.errno in _NOT_A_FOLDER:
        return "a file stands where a folder should be", "move it or set paths.work_dir elsewhere"
    return "", "check that paths.work_dir is a writable folder with free space"


def _reason(error: OSError, target: Path) -> str:
    reason = error.strerror or str(error)
    cause, _ = _advice(error)
    if error.filename and str(error.filename) != str(target) and error.errno not in _NO_ROOM:
        reason = f"{reason} ({error.filename})"
    return f"{reason} ({cause})" if cause else reason


def _folder_error(folder: Path, error: OSError) -> DataError:
    return DataError(f"cannot create folder {folder}: {_reason(error, folder)}; {_advice(error)[1]}")


def _write_error(path: Path, error: OSError) -> DataError:
    kept = f"The previous {path.name} is untouched" if path.exists() else "Nothing was written"
    return DataError(f"cannot write {path}: {_reason(error, path)}. {kept}; {_advice(error)[1]}.")


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _folder_error(folder, error) from None


def _temporary_prefix(path: Path) -> str:
    # The writer's pid and host in the name let a later run tell a dead writer's leftover from a live one's.
    return f".{path.name}.{os.getpid()}@{socket.gethostname()}."


def _remove_stale_temporaries(path: Path) -> None:
    """Delete what writers of ``path`` on this host that no longer run (a killed stage) left behind."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)@{re.escape(socket.gethostname())}\..*\.tmp")
    with contextlib.suppress(OSError):
        for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            match = pattern.fullmatch(leftover.name)
            if match and not process_alive(int(match.group(1))):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether a process of this host with that id still runs (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    An OSError (a full disk, a read-only folder) while creating, writing or renaming becomes a
    ``DataError`` naming ``path`` and what to do; the temporary file is removed and a previous
    ``path`` is left as it was.
    """
    path = Path(path)
    _make_folder(path.parent)
    _remove_stale_temporaries(path)
    try:
        fd, temporary = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide outputs from other users of a shared box
    except OSError as error:
        raise _write_error(path, error) from None
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    except OSError as error:
        raise _write_error(path, error) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary folder beside ``path``; swap it in for ``path`` on success.

    A failed or killed block leaves the previous ``path`` (or none); an OSError becomes a
    ``DataError`` as in ``atomic_path``. A run killed between the two renames of the swap
    leaves the previous folder as ``.<name>.old``, which the next call puts back.
    """
    path = Path(path)
    _make_folder(path.parent)
    _remove_stale_temporaries(path)
    old = path.with_name(f".{path.name}.old")
    if old.exists():
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.replace(old, path)
    try:
        temporary = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent))
        os.chmod(temporary, 0o755)
    except OSError as error:
        raise _write_error(path, error) from None
    try:
        yield temporary
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(temporary, path)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as error:
        raise _write_error(path, error) from None
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


def read_json(path: str | Path, what: str = "file", stage: str = "the stage that writes it"):
    """A JSON artifact, with an error naming the file and ``stage`` (the stage to run) when it is missing or damaged."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} {path} does not exist: run {stage} first")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{what} {path} is not valid JSON ({error}); delete it and re-run {stage}") from None


def read_table(path: str | Path, what: str = "table", stage: str = "the stage that writes it") -> pd.DataFrame:
    """Read a CSV or Parquet artifact with an error naming the file and ``stage`` (the stage to run)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} {path} does not exist: run {stage} first")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except Exception as error:  # pyarrow and pandas raise many types for a damaged file
        raise DataError(f"{what} {path} cannot be read ({error}); delete it and re-run {stage}") from None


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
