"""The Alembic migrations: `adaccounts migrate`, its offline SQL, and the schema check.

`upgrade_to_head` is what `adaccounts migrate` (the deploy Job) runs, and what
the server runs on start for the embedded SQLite default only. On PostgreSQL:

- one migrate at a time per database: a session-level advisory lock, taken on
  the migration connection before reading the current revision, serialises
  concurrent runs (two Jobs racing, a retried Job); the later ones wait, then
  find nothing left to apply;
- every statement runs under `lock_timeout` and `statement_timeout`, so a
  migration that would queue behind a busy table fails fast instead of making
  the traffic queue behind it;
- each revision commits on its own, so a failure names the one revision that
  did not apply, and a retry resumes there.

`schema_state` is what the health monitor asks: is the database at the
revision this code expects?
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TextIO

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from .logs import first_line

# Inside the package (adaccounts_server/migrations: env.py, versions/), so they ship in the
# wheel and are found wherever it is installed; alembic.ini points here for developers.
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# pg_advisory_lock key shared by every `adaccounts migrate` ("adaccts!" as a bigint).
# Advisory locks are per database, so migrations of different databases never wait on each other.
ADVISORY_LOCK_KEY = 0x6164616363747321

VERSION_TABLE = "alembic_version"  # Alembic's default, which env.py keeps

# SQLSTATEs: lock_not_available (lock_timeout), query_canceled (statement_timeout).
LOCK_NOT_AVAILABLE = "55P03"
QUERY_CANCELED = "57014"


@dataclass(frozen=True)
class MigrationOptions:
    """The safety limits of one migrate run (see MIGRATION_* in config)."""

    lock_timeout_s: float = 5.0
    statement_timeout_s: float = 60.0
    wait_s: float = 600.0
    connect_timeout_s: int = 3

    @classmethod
    def from_settings(cls, settings) -> MigrationOptions:  # type: ignore[no-untyped-def]
        return cls(
            lock_timeout_s=settings.MIGRATION_LOCK_TIMEOUT_S,
            statement_timeout_s=settings.MIGRATION_STATEMENT_TIMEOUT_S,
            wait_s=settings.MIGRATION_WAIT_S,
            connect_timeout_s=settings.DB_CONNECT_TIMEOUT,
        )


class MigrationError(Exception):
    """`adaccounts migrate` failed; the message is one line, safe to print (no password)."""

    exit_code = 1


class MigrationBusy(MigrationError):
    """Timed out on a lock or a statement: nothing of the failing revision applied; retry later."""

    exit_code = 3


@dataclass
class MigrationRun:
    """What one run did, filled in by the migrations' env.py as it goes."""

    upgrading: bool = True
    connected: bool = False
    before: tuple[str, ...] = ()
    applied: list[str] = field(default_factory=list)

    @property
    def after(self) -> tuple[str, ...]:
        """Where an upgrade left the database."""
        return (self.applied[-1],) if self.applied else self.before


# --- the script directory (this code's migrations) ---------------------------------------


@cache
def script_directory() -> ScriptDirectory:
    if not MIGRATIONS_DIR.is_dir():
        raise MigrationError(f"migrations not found at {MIGRATIONS_DIR}")
    return ScriptDirectory(str(MIGRATIONS_DIR))


def head_revision() -> str:
    """The revision this code expects the database to be at (the migrations are linear)."""
    head = script_directory().get_current_head()
    assert head is not None, "no migrations"
    return head


def revisions() -> list[str]:
    """Every revision, oldest first."""
    return list(_revisions())


@cache
def _revisions() -> tuple[str, ...]:  # the files do not change under a running process
    return tuple(script.revision for script in reversed(list(script_directory().walk_revisions())))


def is_known(revision: str) -> bool:
    return revision in revisions()


# --- running them ------------------------------------------------------------------------


def alembic_config(
    url: URL, options: MigrationOptions | None = None, *, stdout: TextIO | None = None, run: MigrationRun | None = None
) -> Config:
    """Alembic configured from our settings' URL (the one source of truth); env.py reads the attributes."""
    config = Config(stdout=stdout or sys.stdout)
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["url"] = url
    config.attributes["options"] = options or MigrationOptions()
    config.attributes["run"] = run if run is not None else MigrationRun()
    return config


def upgrade_to_head(url: URL, options: MigrationOptions | None = None) -> MigrationRun:
    """Apply every migration not yet applied (`adaccounts migrate`); raise MigrationError in one line."""
    return _run(url, options, lambda config: command.upgrade(config, "head"))


def upgrade_to(url: URL, revision: str, options: MigrationOptions | None = None) -> MigrationRun:
    return _run(url, options, lambda config: command.upgrade(config, revision))


def downgrade_to(url: URL, revision: str, options: MigrationOptions | None = None) -> MigrationRun:
    """For tests and emergencies: every revision is reversible."""
    return _run(url, options, lambda config: command.downgrade(config, revision), upgrading=False)


def upgrade_sql(url: URL, options: MigrationOptions | None = None, since: str | None = None) -> str:
    """The SQL `upgrade_to_head` would run, without connecting (`adaccounts migrate --sql`).

    From the empty database, or from revision `since` (exclusive) on. The dialect is the URL's.
    """
    if since is not None and not is_known(since):
        raise MigrationError(f"--from {since}: no such revision (known: {', '.join(revisions())})")
    out = io.StringIO()
    config = alembic_config(url, options, stdout=out)
    try:
        command.upgrade(config, f"{since}:head" if since else "head", sql=True)
    except SQLAlchemyError as error:
        raise MigrationError(first_line(error)) from None
    return out.getvalue()


def _run(url: URL, options: MigrationOptions | None, action, upgrading: bool = True) -> MigrationRun:  # type: ignore[no-untyped-def]
    run = MigrationRun(upgrading=upgrading)
    config = alembic_config(url, options, run=run)
    try:
        action(config)
    except MigrationError:
        raise
    except DBAPIError as error:
        raise _explain(error, run, options or MigrationOptions()) from None
    except SQLAlchemyError as error:
        raise MigrationError(first_line(error)) from None
    except Exception as error:  # alembic's CommandError, a migration's own bug: one line, no traceback
        raise MigrationError(f"{type(error).__name__}: {first_line(error)}") from None
    return run


def _explain(error: DBAPIError, run: MigrationRun, options: MigrationOptions) -> MigrationError:
    if not run.connected:
        return MigrationError(f"cannot reach the database: {first_line(error.orig)}")
    failing = _failing_revision(run)
    which = f"{'revision' if run.upgrading else 'the downgrade of revision'} {failing}" if failing else "the migration"
    code = getattr(error.orig, "sqlstate", None)
    if code == LOCK_NOT_AVAILABLE:
        return MigrationBusy(
            f"{which} waited more than {options.lock_timeout_s:g} s for a lock on a table in use "
            f"(MIGRATION_LOCK_TIMEOUT_S); it was not applied{_applied(run)}; retry when the table is less busy"
        )
    if code == QUERY_CANCELED:
        return MigrationBusy(
            f"{which} ran longer than {options.statement_timeout_s:g} s (MIGRATION_STATEMENT_TIMEOUT_S); "
            f"it was not applied{_applied(run)}"
        )
    return MigrationError(f"{which} failed{_applied(run)}: {first_line(error.orig)}")


def _applied(run: MigrationRun) -> str:
    return f" (applied before it: {', '.join(run.applied)})" if run.applied else ""


def _failing_revision(run: MigrationRun) -> str | None:
    """The revision that was being applied (or reverted) when the run failed."""
    order = revisions()
    if not run.upgrading:  # `applied` holds the revisions reverted so far
        if not run.applied:
            return run.before[0] if run.before else None
        position = order.index(run.applied[-1]) if run.applied[-1] in order else 0
        return order[position - 1] if position > 0 else None
    last = run.applied[-1] if run.applied else (run.before[0] if run.before else None)
    if last is None:
        return order[0] if order else None
    if last not in order or order.index(last) + 1 >= len(order):
        return None
    return order[order.index(last) + 1]


# --- what migrations/env.py calls --------------------------------------------------------


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))  # 0 would mean "no limit"


def session_limits_sql(options: MigrationOptions) -> list[str]:
    """The limits every migration statement runs under (PostgreSQL)."""
    return [
        f"SET lock_timeout = {_ms(options.lock_timeout_s)}",
        f"SET statement_timeout = {_ms(options.statement_timeout_s)}",
    ]


@contextmanager
def serialised(connection: Connection, options: MigrationOptions, run: MigrationRun) -> Iterator[None]:
    """Hold the migrate advisory lock (PostgreSQL) for the block; set the statement limits; read
    the revision the database is at once the lock is ours. Outside any migration transaction."""
    postgresql = connection.dialect.name == "postgresql"
    if postgresql:
        _take_advisory_lock(connection, options)
        for statement in session_limits_sql(options):
            connection.execute(text(statement))
    try:
        run.before = database_revisions(connection)
        connection.commit()
        unknown = [revision for revision in run.before if not is_known(revision)]
        if unknown:
            raise MigrationError(
                f"the database is at revision {', '.join(unknown)}, which this code does not know "
                f"(migrated by a newer release?); nothing was applied (this code's head: {head_revision()})"
            )
        yield
    finally:
        if postgresql and not connection.invalidated:
            try:
                connection.rollback()  # a failed migration leaves its transaction aborted
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_LOCK_KEY})
                connection.commit()
            except SQLAlchemyError:
                pass  # the connection is gone, and the lock went with its session


def _take_advisory_lock(connection: Connection, options: MigrationOptions) -> None:
    """Poll pg_try_advisory_lock, idle between tries, until MIGRATION_WAIT_S.

    Not a blocking pg_advisory_lock: a session waiting inside a statement holds a
    snapshot, and the `CREATE INDEX CONCURRENTLY` of the migrate holding the lock
    waits for every older snapshot to go, so the two would deadlock.
    """
    deadline = time.monotonic() + options.wait_s
    pause = 0.05
    while True:
        taken = connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": ADVISORY_LOCK_KEY}).scalar()
        connection.commit()  # no transaction (and no snapshot) left open while waiting
        if taken:
            return
        if time.monotonic() >= deadline:
            raise MigrationBusy(
                f"another `adaccounts migrate` has been running on this database for more than "
                f"{options.wait_s:g} s (MIGRATION_WAIT_S); nothing was applied; retry later"
            )
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 2, 0.5)


def offline_preamble_sql(options: MigrationOptions, dialect: str) -> list[str]:
    """What `serialised` does, as SQL, for the top of `adaccounts migrate --sql` (PostgreSQL)."""
    if dialect != "postgresql":
        return []
    # Applied by hand (psql), it waits for a migrate in progress with a plain
    # pg_advisory_lock: run it when no other migrate is running.
    return [
        f"SET lock_timeout = {_ms(options.wait_s)}",
        f"SELECT pg_advisory_lock({ADVISORY_LOCK_KEY})",
        *session_limits_sql(options),
    ]


def offline_epilogue_sql(dialect: str) -> list[str]:
    return [f"SELECT pg_advisory_unlock({ADVISORY_LOCK_KEY})"] if dialect == "postgresql" else []


# --- the schema check (health) -----------------------------------------------------------


@dataclass(frozen=True)
class SchemaState:
    current: tuple[str, ...]
    expected: str

    @property
    def at_head(self) -> bool:
        return self.current == (self.expected,)

    @property
    def ahead(self) -> bool:
        """Migrated by a newer release (a revision this code does not know): under the
        expand/contract policy that schema still works with this code."""
        return bool(self.current) and not all(is_known(revision) for revision in self.current)

    @property
    def serving(self) -> bool:
        return self.at_head or self.ahead

    @property
    def reason(self) -> str:
        current = ", ".join(self.current) or "none"
        if self.at_head:
            return f"database schema at {current}"
        if self.ahead:
            return (
                f"database schema at {current}, newer than this code's {self.expected} "
                "(a newer release migrated it; migrations are backward compatible)"
            )
        return f"database schema at {current}, code expects {self.expected}: run `adaccounts migrate`"


def database_revisions(connection: Connection) -> tuple[str, ...]:
    """The revision(s) in the database's alembic_version; () for a database never migrated."""
    if not inspect(connection).has_table(VERSION_TABLE):
        return ()
    return tuple(revision for (revision,) in connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")))


def schema_state(connection: Connection) -> SchemaState:
    """The database's alembic revision against this code's head (two cheap queries)."""
    return SchemaState(database_revisions(connection), head_revision())
