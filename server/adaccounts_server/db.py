"""The one engine, the session scope (with each RPC's deadline) and the database ping.

The seed kept a module-level engine built at import; here the engine is built
from settings when the server starts and disposed when it stops, so tests and
worker processes each own theirs. On PostgreSQL, Get's and BatchGet's reads use a few
connections of their own, awaited on the event loop (loop_pool, owned here too).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import namedtuple
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any, TypeVar

from sqlalchemy import Engine, Executable, Row, create_engine, event, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from .config import Settings
from .errors import DeadlineExceeded, first_line
from .loop_pool import LoopPool
from .pg_cancel import CancelRequest

log = logging.getLogger(__name__)

Result = TypeVar("Result")

# Execution option: run the statement under this statement_timeout (ms), sent in
# the same message (see Database.read and _send_timeout_with_statement).
_TIMEOUT_MS = "adaccounts_statement_timeout_ms"


class CallScope:
    """What the database work of one RPC must respect: its caller's deadline, and
    its caller going away. Sessions opened under it turn the remaining time into
    the transaction's statement_timeout, and cancel() stops the query in flight."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline  # time.monotonic() value, None for no deadline
        self._lock = threading.Lock()
        self._connection: Any = None  # the DBAPI connection while a session is open
        self._cancelled = False

    def remaining(self) -> float | None:
        """Seconds left; DeadlineExceeded when none are, or when the caller has gone."""
        if self._cancelled:
            raise DeadlineExceeded("the call was cancelled")
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the deadline passed before the database was asked")
        return left

    def cancel(self) -> None:
        """Ask PostgreSQL to stop this call's running statement (safe from any thread;
        it may block for as long as the database does not answer, never the others)."""
        with self._lock:
            self._cancelled = True
            connection = self._connection
            # Taken while the connection is surely open: attached() waits for this lock.
            request = CancelRequest.of(connection) if connection is not None else None
        if request is not None:
            request.send()
        elif connection is not None:
            try:
                connection.cancel()
            except Exception as error:  # the connection may be broken already
                log.debug("cancelling a statement failed: %s", error)

    @contextmanager
    def attached(self, connection: Any) -> Iterator[None]:
        with self._lock:
            self._connection = connection
        try:
            yield
        finally:
            with self._lock:
                self._connection = None


_current_scope: ContextVar[CallScope | None] = ContextVar("adaccounts_call_scope", default=None)


def run_in_scope(scope: CallScope, work: Callable[..., Result], *args: Any) -> Result:
    """Run `work` (on a worker thread) with every session it opens bound to `scope`."""
    token = _current_scope.set(scope)
    try:
        scope.remaining()  # the caller may have given up while this call queued for a thread
        return work(*args)
    finally:
        _current_scope.reset(token)


class Database:
    """Owns the process's engine and hands out one session per unit of work."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.database_url
        self.engine = build_engine(settings)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False, autoflush=False)
        self._max_statement_s = settings.DB_STATEMENT_TIMEOUT_MAX_S
        self._prebuilt: dict[Executable, tuple[str, Callable[[tuple[Any, ...]], Any]]] = {}
        # Prebuilt reads skip SQLAlchemy's Connection, so its event hooks (tracing's
        # SQL spans) do not see them; traced() turns the shortcut off.
        self._fast_reads = not self.is_sqlite
        # Told how long each ping that answered took (the metrics' ping latency), when set.
        self.on_ping: Callable[[float], None] | None = None
        self._settings = settings
        self._loop_pool: LoopPool | None = None

    @property
    def is_sqlite(self) -> bool:
        return self.url.get_backend_name() == "sqlite"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed if the block returns, rolled back if it raises, always closed.

        On PostgreSQL no statement in it outlives DB_STATEMENT_TIMEOUT_MAX_S or the
        deadline of the RPC it serves, and the RPC's cancellation cancels it.
        """
        scope = _current_scope.get()
        with self._sessions() as session, session.begin():
            if self.is_sqlite:
                yield session
                return
            connection = session.connection()
            # SET LOCAL: scoped to this transaction, so it is also right behind PgBouncer.
            connection.exec_driver_sql(f"SET LOCAL statement_timeout = {self._timeout_ms(scope)}")
            if scope is None:
                yield session
                return
            with scope.attached(connection.connection.dbapi_connection):
                yield session

    def read(
        self, statement: Executable, parameters: dict[str, Any] | None = None, *, prebuilt: bool = False
    ) -> Sequence[Any]:
        """The rows of one read-only statement, in one round trip on PostgreSQL.

        A lone SELECT needs no transaction of its own, so it runs in autocommit (no
        BEGIN/COMMIT pair), and the call's statement_timeout travels in the same
        message: SET LOCAL applies to the implicit transaction of a multi-statement
        query, so it never outlives it and, behind PgBouncer, reaches the same
        server connection as the SELECT.

        `prebuilt`: the statement is a constant without IN-lists. On PostgreSQL it is
        compiled once and run straight on the pooled psycopg2 connection, skipping
        SQLAlchemy's per-execution work, which is a third of a point read's CPU.

        Retried once if its connection turns out dead (a database restart or a
        killed backend): by then the pool has discarded every connection older
        than the failure, so the retry gets a fresh one.
        """
        read_once = self._read_prebuilt if prebuilt and self._fast_reads else self._read_once
        try:
            return read_once(statement, parameters)
        except DBAPIError as error:
            if not error.connection_invalidated:
                raise
            log.info("retrying a read on a fresh connection: %s", first_line(error.orig))
        return read_once(statement, parameters)

    def _read_once(self, statement: Executable, parameters: dict[str, Any] | None) -> Sequence[Row[Any]]:
        scope = _current_scope.get()
        with self.engine.connect() as connection:
            if self.is_sqlite:  # pysqlite opens no transaction for a SELECT anyway
                return connection.execute(statement, parameters).all()
            options = {_TIMEOUT_MS: self._timeout_ms(scope)}
            dbapi_connection = connection.connection.dbapi_connection
            with _autocommit(dbapi_connection), scope.attached(dbapi_connection) if scope else nullcontext():
                return connection.execute(statement, parameters, execution_options=options).all()

    def _read_prebuilt(self, statement: Executable, parameters: dict[str, Any] | None) -> list[Any]:
        sql, make_row = self._compiled(statement)
        scope = _current_scope.get()
        sql = _with_timeout(sql, self._timeout_ms(scope))
        dbapi_error = self.engine.dialect.loaded_dbapi.Error
        pooled = None
        try:
            pooled = self.engine.raw_connection()
            dbapi_connection = pooled.dbapi_connection
            with (
                _autocommit(dbapi_connection),
                scope.attached(dbapi_connection) if scope else nullcontext(),
                dbapi_connection.cursor() as cursor,
            ):
                cursor.execute(sql, parameters)
                return [make_row(values) for values in cursor.fetchall()]
        except dbapi_error as error:
            # What SQLAlchemy's own Connection does with a DBAPI error, for this path.
            disconnected = self.engine.dialect.is_disconnect(error, pooled and pooled.dbapi_connection, None)
            if disconnected and pooled is not None:
                # Discard this connection and every one older: the database probably
                # restarted. The same call SQLAlchemy's Connection makes on a disconnect.
                self.engine.pool._invalidate(pooled, error)
            raise DBAPIError.instance(
                sql, parameters, error, dbapi_error, connection_invalidated=disconnected
            ) from error
        finally:
            if pooled is not None:
                pooled.close()

    def enable_loop_reads(self, cancel_executor: Executor) -> None:
        """From now on, reads_on_loop() serves point reads on the event loop (PostgreSQL
        only; see loop_pool). Cancel requests are sent from `cancel_executor`."""
        if not self._fast_reads:
            return
        settings = self._settings
        self._loop_pool = LoopPool(
            self.engine,
            postgres_connect_args(settings),
            size=settings.DB_READ_POOL_SIZE,
            timeout=settings.DB_POOL_TIMEOUT,
            connect_timeout=settings.DB_CONNECT_TIMEOUT,
            recycle=settings.DB_POOL_RECYCLE,
            pre_ping_idle_s=settings.DB_POOL_PRE_PING_IDLE_S if settings.DB_POOL_PRE_PING else None,
            cancel_executor=cancel_executor,
        )

    @property
    def reads_on_loop(self) -> bool:
        return self._loop_pool is not None

    @property
    def loop_pool(self) -> LoopPool | None:
        """The event loop's connections for point reads, once enable_loop_reads() made them."""
        return self._loop_pool

    async def read_prebuilt_on_loop(
        self, statement: Executable, parameters: dict[str, Any], scope: CallScope | None
    ) -> list[Any]:
        """read(statement, parameters, prebuilt=True), awaited on the event loop: the same
        SQL, timeout and rows, without a worker thread (see loop_pool)."""
        assert self._loop_pool is not None, "enable_loop_reads() first"
        sql, make_row = self._compiled(statement)
        timeout_ms = self._timeout_ms(scope)
        rows = await self._loop_pool.fetchall(_with_timeout(sql, timeout_ms), parameters, timeout_ms / 1000)
        return [make_row(values) for values in rows]

    def _compiled(self, statement: Executable) -> tuple[str, Callable[[tuple[Any, ...]], Any]]:
        """The statement's SQL for this engine and a row maker, built on first use."""
        found = self._prebuilt.get(statement)
        if found is None:
            compiled = statement.compile(dialect=self.engine.dialect)
            names = [column.key for column in statement.selected_columns]  # type: ignore[attr-defined]
            found = self._prebuilt[statement] = (str(compiled), namedtuple("PrebuiltRow", names)._make)
        return found

    def _timeout_ms(self, scope: CallScope | None) -> int:
        """The statement_timeout for a call: its remaining deadline, capped."""
        remaining = scope.remaining() if scope else None
        limit = self._max_statement_s if remaining is None else min(remaining, self._max_statement_s)
        return max(1, int(limit * 1000))

    def traced(self) -> None:
        """Every statement through SQLAlchemy's Connection, where tracing sees it."""
        self._fast_reads = False
        if self._loop_pool is not None:
            self._loop_pool.close()
            self._loop_pool = None

    def ping(self) -> None:
        """`SELECT 1` through the pool; raises when the database cannot answer."""
        started = time.perf_counter()
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        if self.on_ping is not None:
            self.on_ping(time.perf_counter() - started)

    def checked_out(self) -> int:
        """Connections currently lent out by the pools (zero at rest)."""
        on_loop = self._loop_pool.checked_out if self._loop_pool is not None else 0
        return self.engine.pool.checkedout() + on_loop  # type: ignore[attr-defined]

    def dispose(self) -> None:
        if self._loop_pool is not None:
            self._loop_pool.close()
        self.engine.dispose()


@contextmanager
def _autocommit(dbapi_connection: Any) -> Iterator[None]:
    """psycopg2 in autocommit for one statement: no BEGIN/COMMIT round trips.

    Set on psycopg2 itself rather than with SQLAlchemy's isolation_level="AUTOCOMMIT",
    whose undoing costs a `SET default_transaction_isolation` round trip.
    """
    dbapi_connection.autocommit = True
    try:
        yield
    finally:
        if not dbapi_connection.closed:  # back to transactions before the pool lends it again
            dbapi_connection.autocommit = False


def build_engine(settings: Settings) -> Engine:
    url = settings.database_url
    sqlite = url.get_backend_name() == "sqlite"
    if sqlite:
        # Sessions run in worker threads; the pool hands each connection to one thread at a time.
        connect_args: dict[str, Any] = {"check_same_thread": False, "timeout": settings.DB_POOL_TIMEOUT}
    else:
        connect_args = postgres_connect_args(settings)
    engine = create_engine(
        url,
        pool_pre_ping=False,  # see _ping_when_idle
        pool_size=settings.pool_size,
        max_overflow=settings.DB_MAX_OVERFLOW,
        pool_timeout=settings.DB_POOL_TIMEOUT,
        pool_recycle=settings.DB_POOL_RECYCLE,
        connect_args=connect_args,
    )
    if sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        event.listen(engine, "before_cursor_execute", _send_timeout_with_statement, retval=True)
    if settings.DB_POOL_PRE_PING:
        _ping_when_idle(engine, settings.DB_POOL_PRE_PING_IDLE_S)
    return engine


def postgres_connect_args(settings: Settings) -> dict[str, Any]:
    """libpq parameters of every connection, the engine's and the loop pool's."""
    return {
        "connect_timeout": settings.DB_CONNECT_TIMEOUT,
        "application_name": "adaccounts",
        # Notice a peer that vanished (host down, network cut) within ~20 s
        # instead of the kernel's two hours.
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 2,
    }


def _ping_when_idle(engine: Engine, idle_s: float) -> None:
    """Pre-ping only connections idle longer than `idle_s`.

    SQLAlchemy's pre-ping costs a round trip on every checkout, ~10 % of a point
    read here. A connection in steady use needs none: if the database restarted
    under it, its next statement fails as a disconnect, SQLAlchemy then discards
    every connection older than that moment, and Database.read() retries reads
    once. An idle connection is where a restart hides, so it is checked first.
    """

    @event.listens_for(engine, "checkin")
    def _note_idle(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")  # absent on a connection just made
        if idle_since is None or time.monotonic() - idle_since < idle_s:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as error:
            if not engine.dialect.is_disconnect(error, dbapi_connection, None):
                raise
            alive = False
        if not alive:
            raise DisconnectionError("connection found dead by the idle pre-ping")  # the pool reconnects


def _send_timeout_with_statement(  # type: ignore[no-untyped-def]
    _connection, _cursor, statement: str, parameters: Any, context, _executemany: bool
) -> tuple[str, Any]:
    """Prefix `SET LOCAL statement_timeout` to a statement executed with _TIMEOUT_MS:
    psycopg2 sends the two as one simple-query message, one round trip."""
    timeout_ms = context.execution_options.get(_TIMEOUT_MS) if context is not None else None
    if timeout_ms is None:
        return statement, parameters
    return _with_timeout(statement, timeout_ms), parameters


def _with_timeout(sql: str, timeout_ms: int) -> str:
    """One simple-query message: SET LOCAL binds to the implicit transaction of a
    multi-statement query, so the timeout covers `sql` and ends with it."""
    return f"SET LOCAL statement_timeout = {int(timeout_ms)}; {sql}"


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def safe_url(url: URL) -> str:
    """The URL for logs: never the password."""
    return url.render_as_string(hide_password=True)


def init_db(engine: Engine) -> None:
    """Development convenience only: create the tables straight from the models.

    Production and tests build the schema with the Alembic migrations.
    """
    from sqlmodel import SQLModel

    from . import models  # noqa: F401  (registers the tables)

    SQLModel.metadata.create_all(engine)
