"""The database: one connection pool per worker process, every statement awaited on the event loop.

The seed kept a module-level engine built at import; here the database is built
from settings when the server starts and closed when it stops, so tests and
worker processes each own theirs. The repository hands it SQLAlchemy statements
(built once) and gets rows back; what differs between the two backends stays here:

- PostgreSQL (`PostgresDatabase`): psycopg 3's asyncio connections from one
  `psycopg_pool.AsyncConnectionPool` of DB_POOL_SIZE. Each statement is compiled
  once by SQLAlchemy. A write's statements go in the simple-query protocol with
  their parameters bound client-side, the call's `SET LOCAL statement_timeout` in
  the same message (one round trip each). A read is, with DB_PREPARED_STATEMENTS,
  a server-side prepared statement pipelined behind a prepared `set_config` of its
  statement_timeout (one round trip, and PostgreSQL plans it once per connection);
  without, it goes like a write's statement, which a pooler in transaction mode
  that loses prepared statements (PgBouncer before 1.21) needs.
- SQLite, the zero-setup default (`SqliteDatabase`): SQLAlchemy's asyncio engine
  over aiosqlite, with one connection, so writes never contend for SQLite's lock.

Both give rows with the table's Python types (enums as enums) under their column
names, and raise the errors below instead of their drivers' own.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import hashlib
import logging
import re
import time
import uuid
import weakref
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import psycopg
import sqlalchemy as sa
from psycopg import pq
from psycopg.adapt import PyFormat
from psycopg.errors import error_from_result
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg as PsycopgDialect
from sqlalchemy.engine import URL
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal

from .config import Settings

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer
    from psycopg.abc import Transformer as PgTransformer
    from psycopg.pq.abc import PGconn, PGresult
    from psycopg.rows import TupleRow
    from sqlalchemy.engine.interfaces import DBAPIConnection
    from sqlalchemy.ext.asyncio import AsyncConnection as SqliteConnection
    from sqlalchemy.pool import ConnectionPoolEntry

    PgConnection = psycopg.AsyncConnection[TupleRow]

log = logging.getLogger(__name__)

Row = Any  # a row: the selected columns as attributes, with the table's Python types

# How much longer than its statement_timeout a round trip may take before the
# database is deemed to have stopped answering at all (a stalled server cannot
# enforce its own timeout).
ANSWER_GRACE_S = 1.0
# How often a commit whose connection was lost is asked about while the database cannot answer.
_COMMIT_STATUS_RETRY_S = 0.1
# How long a cancelled statement's connection may take to come back to idle before it is closed.
CANCEL_WAIT_S = 2.0
# PostgreSQL's SQLSTATEs: query_canceled (statement_timeout, cancel request), unique_violation.
QUERY_CANCELED = "57014"
UNIQUE_VIOLATION = "23505"
# "prepared statement ... does not exist" (invalid_sql_statement_name), and "already exists".
# A statement this process prepared on a connection, missing from it: a pooler in transaction
# mode lent the connection's transactions to different server connections (PgBouncer before 1.21).
PREPARED_STATEMENT_MISSING = "26000"
DUPLICATE_PREPARED_STATEMENT = "42P05"


# --- what goes wrong, in the database's own terms (errors.py maps these to statuses) ---------


class DatabaseError(Exception):
    """The database could not do what was asked; the message is safe to log (no SQL, no host)."""


class Unreachable(DatabaseError):
    """The database could not be reached, or the connection was lost: nothing was changed."""

    def __init__(self, message: str, *, connection_lost: bool = False) -> None:
        super().__init__(message)
        self.connection_lost = connection_lost  # a read may be retried on a fresh connection


class Busy(DatabaseError):
    """No pooled connection became free in time."""


class TimedOut(DatabaseError):
    """The call's deadline (or DB_STATEMENT_TIMEOUT_MAX_S) ran out before the database answered."""

    def __init__(self, message: str, *, answered: bool = False) -> None:
        super().__init__(message)
        self.answered = answered  # the database itself cancelled the statement (it is alive)


class CommitUnknown(DatabaseError):
    """COMMIT was sent but its answer never came: the write may or may not have been applied."""


class UniqueViolation(DatabaseError):
    """A unique constraint refused the write (the transaction was rolled back)."""


# --- one call's limits -------------------------------------------------------------------------


class CallScope:
    """What the database work of one RPC must respect: its caller's deadline, and the
    database state it must see at least (a consistency token: a WAL position). The database
    records in `lsn` the position of the state the call saw or made, for the caller's token."""

    __slots__ = ("deadline", "lsn", "min_lsn")

    def __init__(self, deadline: float | None, min_lsn: int | None = None) -> None:
        self.deadline = deadline  # time.monotonic() value; None for no deadline
        self.min_lsn = min_lsn
        self.lsn: int | None = None

    def saw(self, lsn: int | None) -> None:
        if lsn is not None and (self.lsn is None or lsn > self.lsn):
            self.lsn = lsn

    def remaining(self) -> float | None:
        """Seconds left; TimedOut when none are."""
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimedOut("the deadline passed before the database was asked")
        return left


NO_DEADLINE = CallScope(None)


# --- a portable "column is one of these" --------------------------------------------------------


class AnyOf(ColumnElement[bool]):
    """`column = ANY(:name)` on PostgreSQL (one constant statement whatever the list's length);
    an expanding `column IN (...)` elsewhere."""

    inherit_cache = True
    type = sa.Boolean()
    # SQLAlchemy's types declare it on the instance (no ClassVar); its own elements set it so.
    _traverse_internals = [  # noqa: RUF012
        ("column", InternalTraversal.dp_clauseelement),
        ("name", InternalTraversal.dp_string),
    ]

    def __init__(self, column: ColumnElement[Any], name: str) -> None:
        self.column = column
        self.name = name


@compiles(AnyOf)
def _in_list(element: AnyOf, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.column.in_(sa.bindparam(element.name, expanding=True)), **kw))


@compiles(AnyOf, "postgresql")
def _any_array(element: AnyOf, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.column == sa.any_(sa.bindparam(element.name)), **kw))


# --- the interface the repository uses ----------------------------------------------------------


class Transaction(ABC):
    @abstractmethod
    async def fetch(self, statement: sa.Executable, parameters: dict[str, Any] | None = None) -> list[Row]:
        """The rows of one statement inside the transaction (none for a statement without rows)."""


class Database(ABC):
    """Owns the process's connections and hands out one transaction per unit of work."""

    is_sqlite = False

    def __init__(self, settings: Settings) -> None:
        self.url = settings.database_url
        self.max_statement_s = settings.DB_STATEMENT_TIMEOUT_MAX_S
        self.pool_size = settings.DB_POOL_SIZE
        self.tracer: Tracer | None = None  # one span per round trip, when set

    def trace(self, tracer: Tracer) -> None:
        """From now on, one span per round trip."""
        self.tracer = tracer

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def fetch(self, statement: sa.Executable, parameters: dict[str, Any] | None, scope: CallScope) -> list[Row]:
        """The rows of one read-only statement, outside any transaction; retried once on a
        fresh connection if the first one turns out dead (a database restart costs no call)."""

    async def read(self, statement: sa.Executable, parameters: dict[str, Any] | None, scope: CallScope) -> list[Row]:
        """Like fetch, for a caller's read that a replica may serve (replicas.py); the others
        (a create's lookups, say) must see the primary and use fetch."""
        return await self.fetch(statement, parameters, scope)

    @abstractmethod
    def transaction(self, scope: CallScope) -> AbstractAsyncContextManager[Transaction]:
        """One transaction: committed if the block returns, rolled back if it raises."""

    @abstractmethod
    async def ping(self, timeout: float) -> None:
        """`SELECT 1`; raises a DatabaseError when the database cannot answer within `timeout`."""

    @abstractmethod
    async def schema_revisions(self, timeout: float) -> tuple[str, ...]:
        """The revision(s) in alembic_version; () for a database never migrated."""

    @abstractmethod
    def checked_out(self) -> int:
        """Connections lent out right now (zero at rest)."""

    def timeout_ms(self, scope: CallScope) -> int:
        """The statement_timeout for a call: its remaining deadline, capped."""
        remaining = scope.remaining()
        limit = self.max_statement_s if remaining is None else min(remaining, self.max_statement_s)
        return max(1, int(limit * 1000))

    def _span(self, sql: str) -> AbstractContextManager[Span | None]:
        if self.tracer is None:
            return nullcontext()
        from opentelemetry.trace import SpanKind

        return self.tracer.start_as_current_span(
            sql.split(None, 1)[0].upper() if sql.strip() else "SQL",
            kind=SpanKind.CLIENT,
            attributes={"db.system": "sqlite" if self.is_sqlite else "postgresql", "db.statement": sql},
        )


def open_database(settings: Settings) -> Database:
    """The backend DATABASE_URL names (not yet opened)."""
    if settings.database_url.get_backend_name() == "sqlite":
        return SqliteDatabase(settings)
    return PostgresDatabase(settings)


# --- PostgreSQL: psycopg 3 and its pool -----------------------------------------------------------


class _Prepared(NamedTuple):
    """A statement as a server-side prepared statement: named after its SQL, so that a
    connection holding one of that name holds this SQL."""

    name: bytes
    sql: bytes  # with $1, $2, ... placeholders
    parameters: tuple[str, ...]  # the parameter of each $n, in order


def _prepared(sql: bytes, parameters: tuple[str, ...] = ()) -> _Prepared:
    return _Prepared(b"adaccounts_" + hashlib.blake2b(sql, digest_size=8).hexdigest().encode(), sql, parameters)


class _Compiled(NamedTuple):
    """A statement compiled once: its SQL cut at the placeholders, and how to make its rows."""

    sql: str  # with %(name)s placeholders: what a trace shows
    texts: tuple[bytes, ...]  # the SQL between the placeholders (one more than names)
    names: tuple[str, ...]  # the parameters, in order of appearance
    make_row: Callable[[Sequence[Any]], Row] | None  # None: the statement returns no rows
    prepared: _Prepared

    def render(self, transformer: PgTransformer, parameters: dict[str, Any] | None) -> bytes:
        """The SQL with each parameter bound client-side as a literal (psycopg's quoting)."""
        if not self.names:
            return self.texts[0]
        assert parameters is not None
        parts = [self.texts[0]]
        for name, text in zip(self.names, self.texts[1:], strict=True):
            parts.append(_literal(transformer, parameters[name]))
            parts.append(text)
        return b"".join(parts)

    def values(self, transformer: PgTransformer, parameters: dict[str, Any] | None) -> list[bytes | None]:
        """The prepared statement's parameters, in PostgreSQL's text format."""
        if not self.prepared.parameters:
            return []
        assert parameters is not None
        return [_text(transformer, parameters[name]) for name in self.prepared.parameters]


def _compiled(sql: str, make_row: Callable[[Sequence[Any]], Row] | None) -> _Compiled:
    pieces = _PLACEHOLDER.split(sql)  # text, name, text, name, ..., text
    texts = tuple(text.replace("%%", "%").encode() for text in pieces[0::2])
    names = tuple(pieces[1::2])
    numbered = tuple(dict.fromkeys(names))  # a parameter used twice is one $n
    dollars = b"".join(b"$%d%s" % (numbered.index(name) + 1, text) for name, text in zip(names, texts[1:], strict=True))
    return _Compiled(sql, texts, names, make_row, _prepared(texts[0] + dollars, numbered))


_PLACEHOLDER = re.compile(r"%\((\w+)\)s")
_TUPLES_OK = pq.ExecStatus.TUPLES_OK
_FATAL_ERROR = pq.ExecStatus.FATAL_ERROR
_COMMAND_OK = pq.ExecStatus.COMMAND_OK
_PIPELINE_SYNC = pq.ExecStatus.PIPELINE_SYNC


# The WAL position of the state a statement saw, asked in the same message after it: on the
# primary, everything committed so far; on a standby, everything replayed so far.
PRIMARY_POSITION = b"SELECT pg_current_wal_insert_lsn()"
STANDBY_POSITION = b"SELECT pg_last_wal_replay_lsn()"
# A prepared read's statement_timeout: set_config's third argument makes it SET LOCAL, and the
# pipeline's one Sync makes the read and this one implicit transaction.
_SET_STATEMENT_TIMEOUT = _prepared(b"SELECT set_config('statement_timeout', $1, true)", ("timeout_ms",))


@dataclass(slots=True)
class _Session:
    """What the service keeps about one pooled connection."""

    transformer: PgTransformer  # psycopg's adaptation context: parameters to literals, text to values
    prepared: set[bytes] = field(default_factory=set)  # the statements prepared on it, by name
    idle_since: float = field(default_factory=time.monotonic)  # when it was last given back


class PostgresDatabase(Database):
    """One PostgreSQL server: the primary (DATABASE_URL), or a read replica (replicas.py),
    which a `role` of "replica-N" marks: its reads give up at their budget without waiting
    for a cancel (the statement_timeout ends the statement there) and are never retried here."""

    def __init__(self, settings: Settings, url: URL | None = None, *, role: str = "primary") -> None:
        super().__init__(settings)
        if url is not None:
            self.url = url
        self.role = role
        self.is_replica = role != "primary"
        self._name = role if self.is_replica else "database"  # in log lines: never the URL
        # Set when replicas are configured: each read reports the position of what it saw.
        self.position_query: bytes | None = None
        self._dialect = PsycopgDialect()  # type: ignore[no-untyped-call]  # SQLAlchemy's dialects are unannotated
        self._compiled: dict[sa.Executable, _Compiled] = {}
        self._sessions: weakref.WeakKeyDictionary[PgConnection, _Session] = weakref.WeakKeyDictionary()
        self._ping_idle_s = settings.DB_POOL_PRE_PING_IDLE_S if settings.DB_POOL_PRE_PING else None
        self.prepares = settings.DB_PREPARED_STATEMENTS  # reads as prepared statements, until a pooler says no
        self._connect_timeout = settings.DB_CONNECT_TIMEOUT
        self._conninfo_kwargs = libpq_parameters(self.url, settings.DB_CONNECT_TIMEOUT)
        self._pool = AsyncConnectionPool(
            # Autocommit: a lone read needs no transaction; writes send their own BEGIN (below).
            kwargs={**self._conninfo_kwargs, "autocommit": True},
            min_size=settings.DB_POOL_SIZE,
            max_size=settings.DB_POOL_SIZE,
            timeout=settings.DB_POOL_TIMEOUT,
            max_lifetime=settings.DB_POOL_RECYCLE,
            # A slot whose reconnection keeps failing is given up after this long and
            # reopened on demand, by the next call that needs it: after an outage the first
            # call reconnects at once instead of waiting out the pool's exponential backoff.
            reconnect_timeout=float(settings.DB_CONNECT_TIMEOUT),
            configure=self._configure,
            check=self._check,
            name=f"adaccounts-{role}",
            open=False,
        )
        self._monitor_connection: PgConnection | None = None  # the health monitor's own (see ping)
        self._reachable = True  # as the last ping found it
        # psycopg's own warnings quote the server's address (SECURITY.md: no hosts in logs); the
        # service reports the same events itself: the health monitor's status, the calls' errors.
        logging.getLogger("psycopg").setLevel(logging.ERROR)

    async def open(self) -> None:
        await self._pool.open(wait=False)

    async def close(self) -> None:
        await self._pool.close(timeout=1.0)
        if self._monitor_connection is not None:
            await self._monitor_connection.close()
            self._monitor_connection = None

    def checked_out(self) -> int:
        stats = self._pool.get_stats()
        return int(stats.get("pool_size", 0) - stats.get("pool_available", 0))

    # --- lending -------------------------------------------------------------------------------

    async def _configure(self, connection: PgConnection) -> None:
        self._sessions[connection] = _Session(psycopg.adapt.Transformer(connection))

    async def _check(self, connection: PgConnection) -> None:
        """The pool's check on lending: a round trip only for a connection idle longer than
        DB_POOL_PRE_PING_IDLE_S. A connection in steady use needs none: if the database
        restarted under it, its next statement fails as a disconnect, every pooled
        connection is then replaced (drain), and reads are retried once."""
        if self._ping_idle_s is None:
            return
        session = self._sessions.get(connection)
        if session is not None and time.monotonic() - session.idle_since < self._ping_idle_s:
            return
        async with asyncio.timeout(self._connect_timeout):
            await _exchange(connection, b"SELECT 1", stop=not self.is_replica)

    async def _getconn(self) -> PgConnection:
        try:
            return await self._pool.getconn()
        except PoolTimeout as error:
            if not self._reachable:
                raise Unreachable("no connection to the database could be made") from error
            raise Busy(f"no database connection became free within {self._pool.timeout:g} s") from error

    async def _putconn(self, connection: PgConnection) -> None:
        session = self._sessions.get(connection)
        if session is not None:
            session.idle_since = time.monotonic()
        await self._pool.putconn(connection)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[PgConnection]:
        connection = await self._getconn()
        try:
            yield connection
        finally:
            await self._putconn(connection)

    # --- statements ----------------------------------------------------------------------------

    def _compile(self, statement: sa.Executable) -> _Compiled:
        """The statement's SQL for psycopg and its row maker, built on first use."""
        found = self._compiled.get(statement)
        if found is None:
            sql = str(statement.compile(dialect=self._dialect))  # type: ignore[attr-defined]
            columns = list(getattr(statement, "exported_columns", ()))
            found = self._compiled[statement] = _compiled(sql, _row_maker(columns) if columns else None)
        return found

    async def _round_trip(
        self,
        connection: PgConnection,
        statement: sa.Executable,
        parameters: dict[str, Any] | None,
        scope: CallScope,
        *,
        begin: bool = False,
        position: bytes | None = None,
        prepared: bool = False,
    ) -> tuple[list[Row], int | None]:
        """The statement's rows, in one round trip with the call's statement_timeout; with
        `begin`, the message also opens a transaction and the second value is its id; with a
        `position` query, the message ends with it and `scope` learns the position; `prepared`
        (a lone read), as prepared statements when DB_PREPARED_STATEMENTS allows."""
        compiled = self._compile(statement)
        timeout_ms = self.timeout_ms(scope)
        session = self._sessions[connection]
        transformer = session.transformer
        # A replica gets no grace: a stalled one costs the read its replica budget, not more.
        grace = 0.0 if self.is_replica else ANSWER_GRACE_S
        with self._span(compiled.sql):
            async with asyncio.timeout(timeout_ms / 1000 + grace):
                results = None
                if prepared and self.prepares:
                    results = await self._pipeline(connection, session, compiled, parameters, timeout_ms, position)
                if results is None:
                    # SET LOCAL binds to the transaction, explicit or the implicit one of a
                    # multi-statement message: the timeout covers this statement and ends with it.
                    sql = b"".join(
                        (
                            b"BEGIN; SELECT txid_current(); " if begin else b"",
                            b"SET LOCAL statement_timeout = %d; " % timeout_ms,
                            compiled.render(transformer, parameters),
                            b"; " + position if position else b"",
                        )
                    )
                    results = await _exchange(connection, sql, stop=not self.is_replica)
        xid = int(results[1].get_value(0, 0)) if begin else None  # type: ignore[arg-type]
        if position:
            scope.saw(parse_lsn(results[-1].get_value(0, 0)))
            results.pop()
        last = results[-1]
        if compiled.make_row is None or last.status != _TUPLES_OK:
            return [], xid
        transformer.set_pgresult(last)
        return transformer.load_rows(0, last.ntuples, compiled.make_row), xid

    async def _pipeline(
        self,
        connection: PgConnection,
        session: _Session,
        compiled: _Compiled,
        parameters: dict[str, Any] | None,
        timeout_ms: int,
        position: bytes | None,
    ) -> list[PGresult] | None:
        """A read's results as `_round_trip` sends it without prepared statements (the
        set_config's in place of SET LOCAL's); None when it must be sent so after all."""
        steps: list[tuple[_Prepared, Sequence[bytes | None]]] = [
            (_SET_STATEMENT_TIMEOUT, [b"%d" % timeout_ms]),
            (compiled.prepared, compiled.values(session.transformer, parameters)),
        ]
        if position:
            steps.append((_position_statement(position), []))
        try:
            return await _exchange_prepared(connection, steps, session.prepared, stop=not self.is_replica)
        except psycopg.Error as error:
            if error.sqlstate == PREPARED_STATEMENT_MISSING:
                self._stop_preparing()
                return None
            if error.sqlstate == DUPLICATE_PREPARED_STATEMENT:
                return None  # prepared by a read cut short (or, behind a pooler, another client): now known
            raise

    def _stop_preparing(self) -> None:
        """A statement prepared on a connection was missing from it: the connection's
        transactions reach different server connections (a pooler in transaction mode). From
        now on this process's reads go as simple queries; the read at hand is sent again so."""
        if self.prepares:
            self.prepares = False
            log.warning(
                "%s: a statement prepared on a connection was missing from it: a pooler in transaction"
                " mode? Reads go without prepared statements from now on; set DB_PREPARED_STATEMENTS=false",
                self._name,
            )

    async def _commit_status(self, xid: int, scope: CallScope) -> str | None:
        """'committed' or 'aborted' (PostgreSQL's txid_status), asked on another connection
        after the one that sent COMMIT was lost; asked again until the caller's deadline (a
        restarting database answers once it is back); None when it could not be learnt. The
        scope learns the WAL position then (after the commit, if it committed)."""
        while True:
            try:
                remaining = scope.remaining()
            except TimedOut:
                return None
            budget = self.max_statement_s if remaining is None else min(remaining, self.max_statement_s)
            try:
                async with asyncio.timeout(budget), self._connection() as connection:
                    (result,) = await _exchange(
                        connection, b"SELECT txid_status(%d), pg_current_wal_insert_lsn()" % xid
                    )
                status = (result.get_value(0, 0) or b"").decode()
                if status in ("committed", "aborted"):
                    scope.saw(parse_lsn(result.get_value(0, 1)))
                    return status
            except TimeoutError:
                return None
            except (DatabaseError, psycopg.Error) as error:
                log.info("asking how a commit ended failed: %s", type(error).__name__)
            await asyncio.sleep(_COMMIT_STATUS_RETRY_S)  # "in progress" (COMMIT still running), or down

    async def fetch(self, statement: sa.Executable, parameters: dict[str, Any] | None, scope: CallScope) -> list[Row]:
        try:
            return await self.fetch_once(statement, parameters, scope)
        except Unreachable as error:
            if not error.connection_lost:
                raise
            log.info("retrying a read on a fresh connection")
        return await self.fetch_once(statement, parameters, scope)

    async def fetch_once(
        self, statement: sa.Executable, parameters: dict[str, Any] | None, scope: CallScope
    ) -> list[Row]:
        """One attempt at a read, on one pooled connection (a replica's reads are never
        retried on the replica: replicas.py asks the primary instead)."""
        connection = await self._getconn()  # not _connection(): a read is the hot path
        try:
            rows, _ = await self._round_trip(
                connection, statement, parameters, scope, position=self.position_query, prepared=True
            )
            return rows
        except Exception as error:
            translated = await self._translate(error, connection)
            if translated is None:
                raise
            raise translated from None
        finally:
            await self._putconn(connection)

    @asynccontextmanager
    async def transaction(self, scope: CallScope) -> AsyncIterator[Transaction]:
        async with self._connection() as connection:
            transaction = _PostgresTransaction(self, connection, scope)
            try:
                yield transaction
            except BaseException:
                await transaction.abandon()
                raise
            if transaction.begun:
                await transaction.commit()

    async def _translate(self, error: BaseException, connection: PgConnection) -> DatabaseError | None:
        """A driver error as one of ours (None: not about the database, a bug say)."""
        if isinstance(error, TimeoutError):
            return TimedOut("the database did not answer before the deadline")
        if isinstance(error, psycopg.Error):
            if error.sqlstate == QUERY_CANCELED:
                return TimedOut("the database did not answer before the deadline", answered=True)
            if error.sqlstate == UNIQUE_VIOLATION:
                return UniqueViolation(getattr(error.diag, "constraint_name", None) or "unique constraint")
            if connection.broken or connection.closed or isinstance(error, psycopg.OperationalError):
                log.warning("%s unavailable: %s", self._name, type(error).__name__)
                if connection.broken or connection.closed:
                    # The database restarted or dropped us: the pooled connections are as dead as this one.
                    await self._pool.drain()
                    return Unreachable("the connection to the database was lost", connection_lost=True)
                return Unreachable("the database is unavailable")
        return None

    # --- health ----------------------------------------------------------------------------------

    async def _monitor(self, timeout: float) -> PgConnection:
        """The health monitor's own connection, so that a pool busy with calls (rows locked,
        say) never reads as a database that is down."""
        connection = self._monitor_connection
        if connection is not None and not connection.closed and not connection.broken:
            return connection
        self._monitor_connection = None
        try:
            async with asyncio.timeout(timeout):
                connection = await psycopg.AsyncConnection.connect(
                    **{**self._conninfo_kwargs, "application_name": "adaccounts-health"},
                    autocommit=True,
                    prepare_threshold=None,
                )
        except (psycopg.Error, TimeoutError) as error:
            raise Unreachable(_connect_failure(error)) from None
        self._monitor_connection = connection
        return connection

    async def _monitor_query(self, sql: str, timeout: float) -> list[tuple[Any, ...]]:
        started = time.monotonic()
        connection = await self._monitor(timeout)
        left = max(0.001, timeout - (time.monotonic() - started))
        try:
            async with asyncio.timeout(left):
                cursor = await connection.execute(sql)
                return list(await cursor.fetchall())
        except (psycopg.Error, TimeoutError) as error:
            self._monitor_connection = None
            await _close_quietly(connection)
            if isinstance(error, TimeoutError):
                raise TimedOut(f"the database did not answer within {timeout:g} s") from None
            raise Unreachable(f"the database failed a ping ({type(error).__name__})") from None

    async def ping(self, timeout: float) -> None:
        await self._ping("SELECT 1", timeout)

    async def ping_position(self, timeout: float) -> int:
        """A ping that also answers the primary's WAL position (how far it has written)."""
        ((position,),) = await self._ping(PRIMARY_POSITION.decode(), timeout)
        return lsn_value(position)

    async def _ping(self, sql: str, timeout: float) -> list[tuple[Any, ...]]:
        """The health monitor's query; what it finds is what a call that cannot get a pooled
        connection is told (Unreachable rather than Busy)."""
        try:
            rows = await self._monitor_query(sql, timeout)
        except DatabaseError:
            self._reachable = False
            raise
        self._reachable = True
        return rows

    async def replay_position(self, timeout: float) -> int:
        """A standby's replay position; Unreachable when this server is not a standby."""
        ((standby, position),) = await self._monitor_query(
            "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text", timeout
        )
        if not standby or position is None:
            raise Unreachable("not a standby (pg_is_in_recovery() is false): it is not replicating")
        return lsn_value(position)

    async def schema_revisions(self, timeout: float) -> tuple[str, ...]:
        exists = await self._monitor_query("SELECT to_regclass('alembic_version') IS NOT NULL", timeout)
        if not exists[0][0]:
            return ()
        rows = await self._monitor_query("SELECT version_num FROM alembic_version", timeout)
        return tuple(revision for (revision,) in rows)


class _PostgresTransaction(Transaction):
    """BEGIN travels with the first statement; COMMIT goes alone once the block is done, and
    once sent it is seen through, so a caller never hears "nothing happened" of a write
    the database then applies."""

    def __init__(self, database: PostgresDatabase, connection: PgConnection, scope: CallScope) -> None:
        self._db = database
        self._connection = connection
        self._scope = scope
        self.begun = False
        self._xid: int | None = None

    async def fetch(self, statement: sa.Executable, parameters: dict[str, Any] | None = None) -> list[Row]:
        begin = not self.begun
        self.begun = True
        try:
            rows, xid = await self._db._round_trip(self._connection, statement, parameters, self._scope, begin=begin)
            if begin:
                self._xid = xid
            return rows
        except Exception as error:
            translated = await self._db._translate(error, self._connection)
            if translated is None:
                raise
            raise translated from None

    async def commit(self) -> None:
        connection = self._connection
        timeout_s = self._db.timeout_ms(NO_DEADLINE) / 1000 + ANSWER_GRACE_S
        # The position after COMMIT is the caller's consistency token: a read that sends it back
        # is served by a database that has replayed this write.
        committing = asyncio.ensure_future(_execute_within(connection, b"COMMIT; " + PRIMARY_POSITION, timeout_s))
        try:
            await asyncio.wait([committing])
        except asyncio.CancelledError:
            # The caller went away with COMMIT on the wire: its outcome, not the
            # cancellation, decides what happened, so wait for it and answer that.
            await asyncio.wait([committing])
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        error = committing.exception()
        if error is None:
            self._scope.saw(parse_lsn(committing.result()[-1].get_value(0, 0)))
            return
        if isinstance(error, psycopg.Error) and error.sqlstate:
            # PostgreSQL answered COMMIT with an error (shutting down, say): not committed.
            translated = await self._db._translate(error, connection)
            raise translated or error
        # The connection was lost with COMMIT on the wire: ask PostgreSQL how it ended.
        await _close_quietly(connection)
        await self._db._pool.drain()
        status = await self._db._commit_status(self._xid, self._scope) if self._xid is not None else None
        if status == "committed":
            return
        if status == "aborted":
            raise Unreachable("the connection to the database was lost before the commit")
        raise CommitUnknown(
            f"the database did not confirm the commit ({type(error).__name__}); the write may have been applied"
        ) from None

    async def abandon(self) -> None:
        """Roll back (the block raised or was cancelled); close the connection if that fails."""
        connection = self._connection
        if connection.closed or connection.info.transaction_status == connection.info.transaction_status.IDLE:
            return
        try:
            await _execute_within(connection, b"ROLLBACK", self._db._connect_timeout)
        except BaseException:
            await _close_quietly(connection)
            raise


async def _execute_within(connection: PgConnection, sql: bytes, timeout_s: float) -> list[PGresult]:
    async with asyncio.timeout(timeout_s):
        return await _exchange(connection, sql)


async def _exchange(connection: PgConnection, sql: bytes, *, stop: bool = True) -> list[PGresult]:
    """Send one simple-query message and gather every result, the event loop watching the
    socket; a result that is an error is raised as psycopg's exception for its SQLSTATE.
    Interrupted, it cancels the statement in PostgreSQL first, unless `stop` is false (a
    replica's read: its statement_timeout ends it there, and the pool closes the connection).

    This is what psycopg's cursor does for a query, on its documented libpq layer
    (`connection.pgconn`) without the cursor: the cursor costs twice the event loop's CPU per
    round trip (bench/round_trip_cost.py: ~80-100 us against ~40 us on the development machine)."""
    connection.pgconn.send_query(sql)
    results = await _gather(connection, stop=stop)
    _raise_error(connection, results)
    return results


async def _gather(connection: PgConnection, *, stop: bool) -> list[PGresult]:
    """Send what is queued on the connection and gather its results (see _exchange)."""
    pgconn = connection.pgconn
    try:
        while pgconn.flush():  # a nonblocking connection may not have sent it all yet
            await _ready(pgconn.socket, write=True)
        return await _results(pgconn)
    except BaseException as error:
        if stop and not (isinstance(error, psycopg.Error) and connection.closed):
            await _stop_statement(connection)
        raise


def _sqlstate(result: PGresult) -> str | None:
    code = result.error_field(pq.DiagnosticField.SQLSTATE)
    return code.decode() if code else None


def _raise_error(connection: PgConnection, results: list[PGresult]) -> None:
    for result in results:
        if result.status == _FATAL_ERROR:
            raise error_from_result(result, encoding=connection.info.encoding)


async def _exchange_prepared(
    connection: PgConnection,
    steps: Sequence[tuple[_Prepared, Sequence[bytes | None]]],
    known: set[bytes],
    *,
    stop: bool,
) -> list[PGresult]:
    """`_exchange` for prepared statements: one pipeline (one round trip, one implicit
    transaction) executing each statement with its parameters, and first preparing those
    the connection does not hold yet (`known`, which learns them). Its results are the
    executions', in order."""
    pgconn = connection.pgconn
    pgconn.enter_pipeline_mode()
    preparing: list[bytes | None] = []  # for each result to come: the name it prepares, or None
    for statement, values in steps:
        if statement.name not in known:
            pgconn.send_prepare(statement.name, statement.sql)
            preparing.append(statement.name)
        pgconn.send_query_prepared(statement.name, values)
        preparing.append(None)
    pgconn.pipeline_sync()
    results = await _gather(connection, stop=stop)
    executions = []
    for result, name in zip(results, preparing, strict=True):
        if name is None:
            executions.append(result)
        elif result.status == _COMMAND_OK or _sqlstate(result) == DUPLICATE_PREPARED_STATEMENT:
            known.add(name)  # prepared now (or before, by a pipeline cut short): it stays
    _raise_error(connection, results)
    return executions


async def _results(pgconn: PGconn) -> list[PGresult]:
    """Every result of the message in progress, until libpq has none left; in pipeline mode
    (where a None only ends one statement's results), until the pipeline's Sync, and the
    connection then leaves pipeline mode."""
    pipeline = bool(pgconn.pipeline_status)
    results: list[PGresult] = []
    while True:
        pgconn.consume_input()
        while not pgconn.is_busy():
            result = pgconn.get_result()
            if result is None:
                if pipeline:
                    continue
                return results
            if pipeline and result.status == _PIPELINE_SYNC:
                pgconn.exit_pipeline_mode()
                return results
            results.append(result)
        await _ready(pgconn.socket)


async def _stop_statement(connection: PgConnection) -> None:
    """The caller went away (or gave up) while its statement may still run: PostgreSQL's
    cancel request, non-blocking (psycopg's cancel_safe), then what is left of the answer.
    A connection that does not come back to idle in time is closed."""
    if connection.closed:
        return
    try:
        async with asyncio.timeout(CANCEL_WAIT_S):
            await connection.cancel_safe(timeout=CANCEL_WAIT_S)
            await _results(connection.pgconn)
    except BaseException:  # no answer in time, the connection broke, or cancelled again
        await _close_quietly(connection)


async def _ready(socket: int, *, write: bool = False) -> None:
    """Until the socket can be read (or written)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    if write:
        loop.add_writer(socket, _set_done, ready)
        try:
            await ready
        finally:
            loop.remove_writer(socket)
    else:
        loop.add_reader(socket, _set_done, ready)
        try:
            await ready
        finally:
            loop.remove_reader(socket)


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _close_quietly(connection: PgConnection) -> None:
    try:
        await connection.close()
    except Exception as error:  # already broken
        log.debug("closing a connection failed: %s", type(error).__name__)


# XLOG_BLCKSZ, and the (MAXALIGNed) short and long WAL page headers: an insert position just
# past a page's header is where the last record ended, at the page boundary.
_WAL_PAGE_BYTES = 8192
_WAL_PAGE_HEADERS = (24, 40)


def lsn_value(text: Any) -> int:
    """PostgreSQL's `X/Y` WAL position (pg_lsn) as one integer: greater is later.

    As the end of the last record, so that a primary's position compares with a standby's
    replay position: when the WAL ends on a page boundary, pg_current_wal_insert_lsn() says
    "after the next page's header" while a standby that replayed everything says "at the
    boundary" (no record ends inside a page header, so this never moves a real record end)."""
    high, _, low = str(text).partition("/")
    position = (int(high, 16) << 32) | int(low, 16)
    if position % _WAL_PAGE_BYTES in _WAL_PAGE_HEADERS:
        return position - position % _WAL_PAGE_BYTES
    return position


def parse_lsn(value: bytes | None) -> int | None:
    """A pg_lsn from a result's text cell (None: NULL, as on a standby not yet replaying)."""
    return None if value is None else lsn_value(value.decode())


def _literal(transformer: PgTransformer, value: Any) -> bytes:
    """`value` as an SQL literal: psycopg's, but a list of UUIDs (BatchGet's ids) is written
    here, as psycopg writes it, without its array dumper's quoting item by item: a UUID's hex
    never needs quoting (docs/decisions/0010)."""
    array = _uuid_array(value)
    if array is not None:
        return b"'%s'::uuid[]" % array
    return transformer.as_literal(_db_value(value))


def _text(transformer: PgTransformer, value: Any) -> bytes | None:
    """`value` in PostgreSQL's text format, for a prepared statement's parameter (the same
    shortcut as `_literal` for a list of UUIDs)."""
    if value is None:
        return None
    if type(value) is uuid.UUID:
        return str(value).encode()
    array = _uuid_array(value)
    if array is not None:
        return array
    value = _db_value(value)
    dumped = transformer.get_dumper(value, PyFormat.TEXT).dump(value)
    return None if dumped is None else bytes(dumped)


def _uuid_array(value: Any) -> bytes | None:
    """A non-empty list of UUIDs as PostgreSQL's array text, `{<hex>,<hex>,…}`; None for anything else."""
    if type(value) is list and value and all(type(item) is uuid.UUID for item in value):
        return b"{%s}" % ",".join([item.hex for item in value]).encode()
    return None


@functools.cache
def _position_statement(sql: bytes) -> _Prepared:
    return _prepared(sql)


def _db_value(value: Any) -> Any:
    """Enums as their stored values, alone or in lists (AnyOf); psycopg adapts the rest."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [_db_value(item) for item in value]
    return value


def _row_maker(columns: Iterable[Any]) -> Callable[[Sequence[Any]], Row]:
    """Rows as named tuples, stored enum values turned back into the table's enums (by a dict
    built once: calling the enum class costs ~1 us a value, a tenth of a List page's time)."""
    columns = list(columns)
    shape = NamedTuple("Row", [(column.key, Any) for column in columns])  # type: ignore[misc]
    enums = [
        (position, {member.value: member for member in kind})
        for position, kind in enumerate(getattr(column.type, "enum_class", None) for column in columns)
        if kind is not None
    ]
    if not enums:
        return shape._make

    def make(values: Sequence[Any]) -> Row:
        values = list(values)
        for position, members in enums:
            value = values[position]
            if value is not None:
                values[position] = members[value]
        return shape._make(values)

    return make


def libpq_parameters(url: URL, connect_timeout: int) -> dict[str, Any]:
    """libpq's connection parameters for `url`, plus the service's own."""
    parameters: dict[str, Any] = {
        key: value
        for key, value in {
            "host": url.host,
            "port": url.port,
            "user": url.username,
            "password": url.password,
            "dbname": url.database,
        }.items()
        if value is not None
    }
    for key, value in url.query.items():  # e.g. sslmode, passfile, options
        parameters[key] = value if isinstance(value, str) else value[-1]
    return {
        **parameters,
        "connect_timeout": connect_timeout,
        "application_name": "adaccounts",
        # Notice a peer that vanished (host down, network cut) within ~20 s
        # instead of the kernel's two hours.
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 2,
    }


def _connect_failure(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "connecting to the database timed out"
    return f"cannot connect to the database ({type(error).__name__})"


# --- SQLite: SQLAlchemy's asyncio engine over aiosqlite ---------------------------------------------


class SqliteDatabase(Database):
    is_sqlite = True

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        from sqlalchemy import event
        from sqlalchemy.ext.asyncio import create_async_engine

        url = settings.database_url.set(drivername="sqlite+aiosqlite")
        # One connection: SQLite has one writer at a time, and a second connection's
        # write would fail with "database is locked" instead of waiting its turn.
        self.engine = create_async_engine(
            url, pool_size=1, max_overflow=0, pool_timeout=settings.DB_POOL_TIMEOUT, pool_pre_ping=False
        )
        self.pool_size = 1
        event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self._checked_out = 0

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        await self.engine.dispose()

    def checked_out(self) -> int:
        return self._checked_out

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[SqliteConnection]:
        try:
            async with self.engine.connect() as connection:
                self._checked_out += 1
                try:
                    yield connection
                finally:
                    self._checked_out -= 1
        except sa.exc.TimeoutError as error:
            raise Busy("no database connection became free in time") from error

    async def fetch(self, statement: sa.Executable, parameters: dict[str, Any] | None, scope: CallScope) -> list[Row]:
        scope.remaining()
        async with self._connection() as connection:
            with self._span(str(statement)):
                result = await connection.execute(statement, parameters)
            return list(result.all()) if result.returns_rows else []

    @asynccontextmanager
    async def transaction(self, scope: CallScope) -> AsyncIterator[Transaction]:
        scope.remaining()
        async with self._connection() as connection:
            try:
                async with connection.begin():
                    yield _SqliteTransaction(self, connection)
            except sa.exc.IntegrityError as error:
                raise UniqueViolation("unique constraint") from error

    async def ping(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout), self.engine.connect() as connection:
                await connection.execute(sa.text("SELECT 1"))
        except (sa.exc.SQLAlchemyError, OSError, TimeoutError) as error:
            raise Unreachable(f"the database failed a ping ({type(error).__name__})") from None

    async def schema_revisions(self, timeout: float) -> tuple[str, ...]:
        from .migrate import database_revisions

        async with asyncio.timeout(timeout), self.engine.connect() as connection:
            return await connection.run_sync(database_revisions)


class _SqliteTransaction(Transaction):
    def __init__(self, database: SqliteDatabase, connection: SqliteConnection) -> None:
        self._db = database
        self._connection = connection

    async def fetch(self, statement: sa.Executable, parameters: dict[str, Any] | None = None) -> list[Row]:
        try:
            with self._db._span(str(statement)):
                result = await self._connection.execute(statement, parameters)
        except sa.exc.IntegrityError as error:
            raise UniqueViolation("unique constraint") from error
        return list(result.all()) if result.returns_rows else []


def _sqlite_pragmas(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


# libpq parameters that may be given in a URL's query and must never be shown.
_SECRET_QUERY_KEYS = frozenset({"password", "sslpassword", "passfile"})


def safe_url(url: URL) -> str:
    """The URL for logs and output: the password masked, wherever it was given."""
    hidden = {key: "***" for key in url.query if key.lower() in _SECRET_QUERY_KEYS}
    return (url.update_query_dict(hidden) if hidden else url).render_as_string(hide_password=True)
