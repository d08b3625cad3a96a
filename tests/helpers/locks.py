"""Holding a lock from another database client, and seeing who waits on one (PostgreSQL only)."""

from __future__ import annotations

import psycopg
from sqlalchemy.engine import URL

from .databases import libpq_url


class HeldLock:
    """Another database client that ran `statement` in a transaction it keeps open (and so
    holds the locks it took) until release(); also a context manager that releases on exit."""

    def __init__(self, database: URL | str, statement: str, parameters: tuple = ()) -> None:
        self.database = libpq_url(database)
        self.connection = psycopg.connect(self.database)
        with self.connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            self.pid: int = cursor.fetchone()[0]
            cursor.execute(statement, parameters or None)
            self.rowcount = cursor.rowcount

    def waiters(self) -> list[int]:
        """The other backends of the database waiting on a lock right now: on this one, as a rule."""
        return lock_waiters(self.database, self.pid)

    def release(self) -> None:
        """Roll the transaction back (the locks go with it) and disconnect; again is a no-op."""
        if not self.connection.closed:
            self.connection.rollback()
            self.connection.close()

    def __enter__(self) -> HeldLock:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


def row_lock(database: URL | str, account_id: str) -> HeldLock:
    """One account's row locked (SELECT ... FOR UPDATE) until released: writes to it wait."""
    lock = HeldLock(database, "SELECT 1 FROM ad_accounts WHERE id = %s FOR UPDATE", (account_id,))
    assert lock.rowcount == 1, f"no account {account_id} to lock"
    return lock


def table_lock(database: URL | str) -> HeldLock:
    """ad_accounts locked ACCESS EXCLUSIVE until released: even reads of it wait."""
    return HeldLock(database, "LOCK TABLE ad_accounts IN ACCESS EXCLUSIVE MODE")


def lock_waiters(database: URL | str, holder: int | None = None) -> list[int]:
    """The backends of the database waiting on a lock right now (other than `holder`), by pid.
    From a connection of its own: pg_stat_activity is a snapshot per transaction."""
    with psycopg.connect(libpq_url(database), autocommit=True) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            " AND pid <> pg_backend_pid() AND pid IS DISTINCT FROM %s",
            (holder,),
        )
        return [row[0] for row in cursor.fetchall()]
