"""A PgBouncer in transaction-pooling mode in front of a test PostgreSQL.

Debian's `pgbouncer` package provides the binary (`.ci/run` installs it; tests
never install packages). Each PgBouncer gets a temporary directory with its
config, user list, log and pid file, listens on 127.0.0.1 only, on a free port,
and is stopped by `stop()` (or the context manager).

PgBouncer refuses to run as root: when the tests run as root it runs as the
`postgres` user, like the throwaway PostgreSQL.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import psycopg
from sqlalchemy.engine import URL

from .pg_instance import OS_USER
from .polling import wait_until
from .ports import free_port

PGBOUNCER = Path(os.environ.get("ADACCOUNTS_TEST_PGBOUNCER", "/usr/sbin/pgbouncer"))
INSTALL_HINT = (
    "PgBouncer is not installed: the PgBouncer tests need Debian's `pgbouncer` package "
    "(`apt-get install -y --no-install-recommends pgbouncer`, as .ci/run does), "
    "or ADACCOUNTS_TEST_PGBOUNCER=/path/to/pgbouncer"
)

# Seconds PgBouncer waits before trying again to log in to a PostgreSQL that refused
# it (its default is 15 s, which would dominate every recovery measured here).
SERVER_LOGIN_RETRY_S = 1
# How long a client's query may wait for a server connection before PgBouncer
# fails it (default 120 s): shorter than the gRPC deadlines the tests use, so a
# query queued while PostgreSQL is down fails instead of hanging on to a worker thread.
QUERY_WAIT_TIMEOUT_S = 3


def pgbouncer_binary() -> Path | None:
    """The PgBouncer executable, or None when it is not installed."""
    if PGBOUNCER.is_file() and os.access(PGBOUNCER, os.X_OK):
        return PGBOUNCER
    found = shutil.which("pgbouncer")
    return Path(found) if found else None


class PgBouncer:
    """One PgBouncer process (pool_mode=transaction, auth_type=trust) for one PostgreSQL database."""

    def __init__(
        self,
        backend_host: str,
        backend_port: int,
        database: str,
        *,
        user: str = "postgres",
        pool_size: int = 20,
        max_client_conn: int = 200,
    ) -> None:
        binary = pgbouncer_binary()
        if binary is None:
            raise RuntimeError(INSTALL_HINT)
        self.binary = binary
        self.database = database
        self.user = user
        self.port = free_port()
        self._as_root = os.geteuid() == 0
        self.directory = Path(tempfile.mkdtemp(prefix="adaccounts-pgbouncer-"))
        self.log = self.directory / "pgbouncer.log"
        self.config = self.directory / "pgbouncer.ini"
        (self.directory / "userlist.txt").write_text(f'"{user}" ""\n')
        self.config.write_text(
            "\n".join(
                [
                    "[databases]",
                    f"{database} = host={backend_host} port={backend_port} dbname={database} user={user}",
                    "",
                    "[pgbouncer]",
                    "listen_addr = 127.0.0.1",
                    f"listen_port = {self.port}",
                    "unix_socket_dir =",
                    "auth_type = trust",
                    f"auth_file = {self.directory / 'userlist.txt'}",
                    f"admin_users = {user}",
                    "pool_mode = transaction",
                    f"default_pool_size = {pool_size}",
                    f"max_client_conn = {max_client_conn}",
                    # psycopg/libpq or SQLAlchemy may send these at connect; PgBouncer
                    # refuses unknown startup parameters unless told to ignore them.
                    "ignore_startup_parameters = extra_float_digits,options",
                    f"server_login_retry = {SERVER_LOGIN_RETRY_S}",
                    f"query_wait_timeout = {QUERY_WAIT_TIMEOUT_S}",
                    "server_connect_timeout = 3",
                    f"logfile = {self.log}",
                    f"pidfile = {self.directory / 'pgbouncer.pid'}",
                    "",
                ]
            )
        )
        if self._as_root:
            shutil.chown(self.directory, OS_USER, OS_USER)
            for path in self.directory.iterdir():
                shutil.chown(path, OS_USER, OS_USER)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> URL:
        """SQLAlchemy URL (psycopg 3) of the database through PgBouncer."""
        return URL.create(
            "postgresql+psycopg", username=self.user, host="127.0.0.1", port=self.port, database=self.database
        )

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={self.database} connect_timeout=5"

    @property
    def admin_dsn(self) -> str:
        """The admin console (SHOW POOLS, SHOW SERVERS...)."""
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname=pgbouncer connect_timeout=5"

    def start(self, timeout: float = 15.0) -> None:
        # As root, the child switches to the postgres user itself (no runuser in between),
        # so the process we signal is PgBouncer.
        as_user = {"user": OS_USER, "group": OS_USER, "extra_groups": []} if self._as_root else {}
        self._process = subprocess.Popen(
            [str(self.binary), str(self.config)],
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            **as_user,
        )
        process = self._process

        def accepts() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited with {process.returncode}:\n{self.log_tail()}")
            try:
                psycopg.connect(self.admin_dsn).close()
            except psycopg.OperationalError:
                return False
            return True

        try:
            wait_until(accepts, timeout, message="pgbouncer to accept connections")
        except AssertionError:
            self.stop()
            raise RuntimeError(f"pgbouncer did not accept connections in {timeout:g} s:\n{self.log_tail()}") from None

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        # SIGTERM: immediate shutdown (SIGINT would wait for queries in progress).
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def cleanup(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def log_tail(self, characters: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-characters:] if self.log.exists() else ""

    def __enter__(self) -> PgBouncer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.cleanup()
