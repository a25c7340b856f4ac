"""A throwaway PostgreSQL server for tests: initdb in a temporary folder, pg_ctl on loopback.

Needs Debian's ``postgresql`` package (initdb and pg_ctl in /usr/lib/postgresql/<version>/bin)
and psycopg2. PostgreSQL refuses to run as root, so under root the server runs as the
``postgres`` user (or ``nobody``) in a folder that user owns.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def find_bin_dir() -> Path | None:
    """The folder holding initdb and pg_ctl (the newest Debian version first, then PATH), or None."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                        if Path(p).parent.name.isdigit() else 0, reverse=True)
    found = shutil.which("initdb")
    if found:
        candidates.append(str(Path(found).resolve().parent))
    for folder in map(Path, candidates):
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def postgres_cluster(bin_dir: Path):
    """Start a fresh cluster on 127.0.0.1; yield ``database(name) -> URL``, which creates an empty database.

    The server is stopped and its folder deleted on exit.
    """
    import psycopg2

    folder = Path(tempfile.mkdtemp(prefix="pg-cluster-"))  # under /tmp: reachable by the server's user
    run_as: list[str] = []
    if os.geteuid() == 0:
        user = next(u for u in ("postgres", "nobody") if _user_exists(u))
        entry = pwd.getpwnam(user)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
        run_as = ["runuser", "-u", user, "--"]
    data, log, port = folder / "data", folder / "server.log", _free_port()

    def run(*args) -> None:
        result = subprocess.run([*run_as, *map(str, args)], capture_output=True, text=True, cwd=folder)
        if result.returncode != 0:
            server_log = log.read_text() if log.exists() else ""
            raise RuntimeError(f"{' '.join(map(str, args))} failed:\n{result.stdout}{result.stderr}{server_log}")

    def database(name: str) -> str:
        connection = psycopg2.connect(host="127.0.0.1", port=port, user="tuner", dbname="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {name}")
        connection.close()
        return f"postgresql://tuner@127.0.0.1:{port}/{name}"

    try:
        run(bin_dir / "initdb", "-D", data, "-U", "tuner", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync")
        run(bin_dir / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "-o",
            f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off -c max_connections=50", "start")
        yield database
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, cwd=folder)
        shutil.rmtree(folder, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
