"""A throwaway PostgreSQL server for tests that stop, stall or restart the database.

Such tests must never touch the shared PostgreSQL on 127.0.0.1:5432, so each
gets its own cluster: initdb in a temporary directory, trust auth, listening on
127.0.0.1 only on a free port, its unix socket inside the temporary directory.

initdb and postgres refuse to run as root; when the tests run as root the
PostgreSQL binaries run as the `postgres` user (runuser), in a directory owned
by that user. Otherwise they run as the current user.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import psycopg
from sqlalchemy.engine import URL

from .ports import free_port

# Debian's PostgreSQL 15 (`pg_config --bindir`); override for another install.
PG_BINDIR = Path(os.environ.get("ADACCOUNTS_TEST_PG_BINDIR", "/usr/lib/postgresql/15/bin"))
OS_USER = "postgres"  # who runs the binaries when the tests run as root


class ThrowawayPostgres:
    """One private PostgreSQL cluster with one database, for one test module or test.

    start() creates the cluster and the database the first time, and just starts
    the server afterwards; stop() is a fast shutdown (clients are disconnected);
    pause()/resume() freeze and thaw the postmaster and every backend, so the
    server still accepts TCP connections but never answers anything.
    """

    def __init__(self, database: str = "adaccounts") -> None:
        self.database = database
        self.port = free_port()
        self._as_root = os.geteuid() == 0
        self.directory = Path(tempfile.mkdtemp(prefix="adaccounts-pg-"))
        self.data = self.directory / "data"
        self.log = self.directory / "postgres.log"
        if self._as_root:
            shutil.chown(self.directory, OS_USER, OS_USER)
        self._initialised = False
        self._paused: list[int] = []

    # --- the URL the server under test uses --------------------------------------------------

    @property
    def url(self) -> URL:
        """SQLAlchemy URL (psycopg 3) of the test database, as the `postgres` superuser."""
        return URL.create(
            "postgresql+psycopg", username="postgres", host="127.0.0.1", port=self.port, database=self.database
        )

    @property
    def dsn(self) -> str:
        """libpq DSN of the test database, for psycopg.connect."""
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={self.database} connect_timeout=5"

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if not self._initialised:
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            )
        self._run(
            "pg_ctl",
            "start",
            "-w",
            "-t",
            "30",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            # Durability is irrelevant for a throwaway cluster; speed is not.
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off",
        )
        if not self._initialised:
            connection = psycopg.connect(
                host="127.0.0.1", port=self.port, user="postgres", dbname="postgres", connect_timeout=5, autocommit=True
            )
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{self.database}"')
            connection.close()
            self._initialised = True

    def stop(self) -> None:
        """Fast shutdown: roll back open transactions, disconnect every client, wait until down."""
        self.resume()
        self._run("pg_ctl", "stop", "-w", "-t", "30", "-m", "fast", "-D", str(self.data))

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._postmaster_pid() is not None

    def pause(self) -> None:
        """SIGSTOP the postmaster and all its children: TCP connects still succeed
        (the kernel completes them), but nothing is ever answered."""
        postmaster = self._postmaster_pid()
        if postmaster is None:
            raise RuntimeError("cannot pause: PostgreSQL is not running")
        # The postmaster first, so that it forks no new backend while the others are stopped.
        os.kill(postmaster, signal.SIGSTOP)
        self._paused.append(postmaster)
        for child in _children(postmaster):
            os.kill(child, signal.SIGSTOP)
            self._paused.append(child)

    def resume(self) -> None:
        """SIGCONT everything pause() stopped (a no-op when not paused)."""
        while self._paused:
            pid = self._paused.pop()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def cleanup(self) -> None:
        """Stop the server whatever its state (immediate shutdown) and delete the cluster."""
        try:
            self.resume()
            if self.running:
                self._run("pg_ctl", "stop", "-w", "-t", "30", "-m", "immediate", "-D", str(self.data), check=False)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> ThrowawayPostgres:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.cleanup()

    # --- plumbing ----------------------------------------------------------------------------

    def _postmaster_pid(self) -> int | None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().splitlines()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return None
        return pid if Path(f"/proc/{pid}").exists() else None

    def _run(self, program: str, *args: str, check: bool = True) -> None:
        command = [str(PG_BINDIR / program), *args]
        if self._as_root:
            command = ["runuser", "-u", OS_USER, "--", *command]
        result = subprocess.run(
            command, cwd=self.directory, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )
        if check and result.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{program} {' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}\n{log}"
            )


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (PostgreSQL's backends and auxiliary processes), from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 is the parent pid; field 2 (comm) is parenthesised and may contain spaces.
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            children.append(int(entry.name))
    return children
