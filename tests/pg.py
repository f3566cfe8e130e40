"""A real, throwaway PostgreSQL server for tests.

The PostgreSQL store is tested against the real thing, not a mock: its ordering guarantee
rests on PostgreSQL's own row locks. `PostgresServer.start` finds Debian's server binaries
(installing them with ``scripts/pg-setup.sh`` when missing and running as root), runs
``initdb`` in a fresh temporary directory, starts the server on a free loopback port and waits
until it accepts connections. `stop` shuts it down and removes the directory.

PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` system user
that Debian's package creates. The data directory lives in a private temporary directory and
TCP connections need a random password, so other users of the machine cannot reach it. The
server trades durability for speed (``fsync=off``): it holds nothing worth keeping.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

__all__ = ["PostgresServer", "PostgresUnavailable", "create_database"]

REPO = Path(__file__).resolve().parents[1]
SETUP_SCRIPT = REPO / "scripts" / "pg-setup.sh"

# Limits for the slow steps, generous for a loaded two-core machine.
INSTALL_TIMEOUT_S = 600
INITDB_TIMEOUT_S = 120
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30

# A free port can be taken by someone else between our probe and the server's bind.
START_ATTEMPTS = 3


class PostgresUnavailable(Exception):
    """No PostgreSQL server can be provided on this machine; the message says why."""


def find_bindir() -> Path | None:
    """The newest Debian PostgreSQL ``bin`` directory holding initdb, or None."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else -1,
    )
    return found[-1].parent if found else None


def ensure_binaries() -> Path:
    """Debian's PostgreSQL binaries, installed first if missing and we are root."""
    bindir = find_bindir()
    if bindir is not None:
        return bindir
    if os.geteuid() != 0:
        raise PostgresUnavailable(
            "PostgreSQL binaries not found under /usr/lib/postgresql and not root to install"
            " them; run scripts/pg-setup.sh as root"
        )
    result = subprocess.run(
        ["bash", str(SETUP_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        check=False,
    )
    bindir = find_bindir()
    if result.returncode != 0 or bindir is None:
        raise PostgresUnavailable(
            f"scripts/pg-setup.sh failed (exit {result.returncode}): {result.stderr[-2000:]}"
        )
    return bindir


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def create_database(admin_url: str, name: str) -> str:
    """Create an empty database on the server of `admin_url`; return its URL."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    parts = urlsplit(admin_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


class PostgresServer:
    """One initdb'd PostgreSQL server in a temporary directory; `url` is set once started."""

    def __init__(self, database: str = "freemark") -> None:
        self.database = database
        self.url = ""
        self._root: Path | None = None
        self._bindir: Path | None = None
        self._run_as: list[str] = []

    def start(self) -> str:
        """Start the server and create the database; return the superuser URL to it."""
        self._bindir = ensure_binaries()
        self._root = Path(tempfile.mkdtemp(prefix="freemark-pg-"))
        try:
            self._prepare_user()
            password = secrets.token_hex(16)
            self._initdb(password)
            port = self._start_on_free_port()
            admin_url = f"postgresql://postgres:{password}@127.0.0.1:{port}/postgres"
            self._wait_until_accepting(admin_url)
            self.url = create_database(admin_url, self.database)
        except BaseException:
            self.stop()
            raise
        return self.url

    def stop(self) -> None:
        """Shut the server down (if it runs) and remove its directory."""
        if self._root is None:
            return
        data = self._root / "data"
        if (data / "postmaster.pid").exists():
            stopped = self._pg_ctl("stop", "-m", "fast", "-w", "-t", str(STOP_TIMEOUT_S))
            if stopped.returncode != 0:
                self._kill_postmaster(data)
        shutil.rmtree(self._root, ignore_errors=True)
        self._root = None
        self.url = ""

    # steps

    def _prepare_user(self) -> None:
        assert self._root is not None
        if os.geteuid() != 0:
            return
        try:
            user = pwd.getpwnam("postgres")
        except KeyError as e:
            raise PostgresUnavailable(
                "running as root, and there is no 'postgres' user to run the server as"
            ) from e
        os.chown(self._root, user.pw_uid, user.pw_gid)
        self._run_as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self._run_as, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self._root,
        )

    def _initdb(self, password: str) -> None:
        assert self._root is not None and self._bindir is not None
        pwfile = self._root / "pwfile"
        pwfile.write_text(password + "\n")
        if self._run_as:
            shutil.chown(pwfile, "postgres", "postgres")
        result = self._run(
            str(self._bindir / "initdb"),
            "-D",
            str(self._root / "data"),
            "-U",
            "postgres",
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
            timeout=INITDB_TIMEOUT_S,
        )
        pwfile.unlink()
        if result.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {result.stderr[-2000:]}")

    def _pg_ctl(self, *args: str, options: str = "") -> subprocess.CompletedProcess[str]:
        assert self._root is not None and self._bindir is not None
        extra = ["-o", options] if options else []
        return self._run(
            str(self._bindir / "pg_ctl"),
            "-D",
            str(self._root / "data"),
            "-l",
            str(self._root / "server.log"),
            *extra,
            *args,
            timeout=START_TIMEOUT_S + STOP_TIMEOUT_S,
        )

    def _start_on_free_port(self) -> int:
        assert self._root is not None
        log = self._root / "server.log"
        for _ in range(START_ATTEMPTS):
            port = _free_port()
            options = " ".join(
                [
                    "-c listen_addresses=127.0.0.1",
                    f"-p {port}",
                    f"-k {self._root}",  # unix socket in our private directory, not /run
                    "-c fsync=off",
                    "-c synchronous_commit=off",
                    "-c full_page_writes=off",
                ]
            )
            started = self._pg_ctl("start", "-w", "-t", str(START_TIMEOUT_S), options=options)
            if started.returncode == 0:
                return port
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else started.stderr
        raise PostgresUnavailable(f"postgres did not start: {tail}")

    def _wait_until_accepting(self, admin_url: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with psycopg.connect(admin_url, connect_timeout=5) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as e:
                if time.monotonic() > deadline:
                    raise PostgresUnavailable(f"postgres does not accept connections: {e}")
                time.sleep(0.1)

    def _kill_postmaster(self, data: Path) -> None:
        """Last resort when pg_ctl cannot stop the server: SIGKILL the postmaster we started."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((data / "postmaster.pid").read_text().splitlines()[0])
            os.kill(pid, 9)
