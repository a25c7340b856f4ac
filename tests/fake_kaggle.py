"""A fake ``kaggle`` executable for tests: put first on PATH, it answers the few commands the pipeline runs.

It records every call (one JSON list of arguments a line) and:
- ``competitions download -c NAME -p DIR``: zips the folder ``$FAKE_KAGGLE_COMPETITION`` into ``DIR/NAME.zip``;
- ``competitions submissions -c NAME -v``: prints the file ``$FAKE_KAGGLE_SUBMISSIONS`` (a CSV);
- ``datasets status ID``: "ready" when ``$FAKE_KAGGLE_DATASET_EXISTS`` is set, else a 404 and exit 1;
- anything else (submit, datasets create/version, kernels push): prints a success line;
- with ``$FAKE_KAGGLE_AUTH_FAIL`` set, every command fails the way the CLI does without a login, printing the token
  it was given (``KAGGLE_API_TOKEN``), so a test can check that the pipeline never shows it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SCRIPT = r'''
import json, os, shutil, sys
from pathlib import Path

args = sys.argv[1:]
with open(os.environ["FAKE_KAGGLE_CALLS"], "a") as calls:
    calls.write(json.dumps(args) + "\n")
if os.environ.get("FAKE_KAGGLE_AUTH_FAIL"):
    token = os.environ.get("KAGGLE_API_TOKEN", "")
    sys.stderr.write(f"401 Client Error: Unauthorized for url: https://www.kaggle.com/api/v1 (token {token})\n")
    sys.exit(1)

def option(flag):
    return args[args.index(flag) + 1]

if args[:2] == ["competitions", "download"]:
    name = option("-c")
    shutil.make_archive(str(Path(option("-p")) / name), "zip", os.environ["FAKE_KAGGLE_COMPETITION"])
    print(f"Downloading {name}.zip to {option('-p')}")
elif args[:2] == ["competitions", "submissions"]:
    sys.stdout.write(Path(os.environ["FAKE_KAGGLE_SUBMISSIONS"]).read_text())
elif args[:2] == ["datasets", "status"]:
    if os.environ.get("FAKE_KAGGLE_DATASET_EXISTS"):
        print("ready")
    else:
        sys.stderr.write("404 Client Error: Not Found\n")
        sys.exit(1)
else:
    print("Successfully done: " + " ".join(args[:2]))
'''


def install(tmp_path: Path, monkeypatch, **env: str) -> Path:
    """Put the fake first on an otherwise empty PATH, with a clean HOME and no Kaggle variables; returns the calls
    file. ``env`` sets further variables (``FAKE_KAGGLE_COMPETITION=...``)."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    executable = bin_dir / "kaggle"
    executable.write_text(f"#!{sys.executable}\n{SCRIPT}")
    executable.chmod(0o755)
    calls = tmp_path / "kaggle-calls.jsonl"
    calls.touch()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FAKE_KAGGLE_CALLS", str(calls))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return calls


def calls(path: Path) -> list[list[str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]
