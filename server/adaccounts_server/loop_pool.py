"""Point reads on the event loop: psycopg2 connections in asynchronous mode.

A read handed to a worker thread crosses threads twice and makes the worker and
the event loop take turns at the GIL; measured here, those handoffs (tens of
context switches per call) cost more than the read itself, and one process
served ~1,500 GetAdAccount/s with a third of the CPU idle. Sent and awaited on
the event loop instead (psycopg2's asynchronous mode, the loop watching the
socket), the same read needs no thread at all: ~2,500-3,000/s per process, the
loop being the one busy thread.

So PostgreSQL's constant reads (GetAdAccount, BatchGetAdAccounts) run here, on
connections of their own: up to DB_READ_POOL_SIZE per process besides the
engine's pool, which keeps serving writes, List and the health monitor. They
keep what the engine's reads guarantee:

- one round trip: asynchronous connections are always in autocommit, and the
  caller's `SET LOCAL statement_timeout` travels with the SELECT (db._with_timeout);
- pre-ping only for connections idle longer than DB_POOL_PRE_PING_IDLE_S, and a
  read that meets a dead connection discards every idle one and is retried once
  on a fresh connection (a database restart costs no failed call);
- a caller that cancels or runs out of time cancels the statement in PostgreSQL
  (libpq's cancel request, sent from a cancel thread since it may block) and the
  connection is dropped; nothing on the loop ever waits on the database;
- errors come out as SQLAlchemy's DBAPIError (connection_invalidated on a
  disconnect) or its pool TimeoutError, so errors.to_status maps them as before.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import psycopg2
import psycopg2.extensions
import psycopg2.extras
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from .errors import DeadlineExceeded, first_line
from .pg_cancel import CancelRequest

log = logging.getLogger(__name__)

# How much longer than the statement_timeout a read may wait for PostgreSQL's
# answer before it gives up on a database that stopped answering at all.
_ANSWER_GRACE_S = 1.0


class _Connection:
    """One asynchronous psycopg2 connection and when it was made and last used."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.created = time.monotonic()
        self.idle_since = self.created


class LoopPool:
    """At most `size` asynchronous connections, each lent to one read at a time, all on one event loop."""

    def __init__(
        self,
        engine: Engine,
        connect_args: dict[str, Any],
        *,
        size: int,
        timeout: float,
        connect_timeout: float,
        recycle: float,
        pre_ping_idle_s: float | None,
        cancel_executor: Executor,
    ) -> None:
        self._dialect = engine.dialect
        _, params = engine.dialect.create_connect_args(engine.url)
        self._params = {**params, **connect_args}
        self._size = size
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._recycle = recycle
        self._pre_ping_idle_s = pre_ping_idle_s
        self._cancel_executor = cancel_executor
        # libpq resolves the host name while it starts to connect: one thread of its own
        # does that, so neither the loop nor busy worker threads ever wait on DNS.
        self._connect_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="db-connect")
        self._idle: list[_Connection] = []
        self._count = 0  # connections open or being opened: idle, lent out, connecting
        self._waiters: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    @property
    def checked_out(self) -> int:
        """Connections lent out or being opened (zero at rest)."""
        return self._count - len(self._idle)

    async def fetchall(self, sql: str, parameters: dict[str, Any] | None, answer_within: float) -> list[Any]:
        """The rows of `sql`, in one round trip; retried once on a fresh connection if
        the first one turns out dead. PostgreSQL has `answer_within` seconds to answer."""
        try:
            return await self._fetch_once(sql, parameters, answer_within)
        except DBAPIError as error:
            if not error.connection_invalidated:
                raise
            log.info("retrying a read on a fresh connection: %s", first_line(error.orig))
        return await self._fetch_once(sql, parameters, answer_within)

    async def _fetch_once(self, sql: str, parameters: dict[str, Any] | None, answer_within: float) -> list[Any]:
        connection = await self._acquire()
        try:
            cursor = connection.raw.cursor()
            cursor.execute(sql, parameters)
            await _wait(connection.raw, answer_within + _ANSWER_GRACE_S)
            rows = cursor.fetchall()
        except BaseException as error:
            disconnected = self._is_disconnect(error, connection.raw)
            self._discard(connection, disconnected)
            if isinstance(error, TimeoutError):
                raise DeadlineExceeded("the database did not answer before the deadline") from None
            if isinstance(error, psycopg2.Error):
                raise DBAPIError.instance(
                    sql, parameters, error, psycopg2.Error, connection_invalidated=disconnected
                ) from error
            raise
        self._release(connection)
        return rows

    # --- lending ---------------------------------------------------------------------------
    # A connection coming back goes straight to the oldest waiting read, so that
    # under load a read waits its turn instead of losing every race to newcomers.

    async def _acquire(self) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if await self._usable(connection):
                return connection
        if self._count < self._size:
            self._count += 1
            return await self._connect_in_slot()
        handed = await self._wait_for_a_turn()
        return handed if handed is not None else await self._connect_in_slot()

    async def _wait_for_a_turn(self) -> _Connection | None:
        """A connection handed back by a finished read, or None: a slot to connect in."""
        waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._timeout):
                return await waiter
        except BaseException as error:
            if waiter.done() and not waiter.cancelled():
                # Handed something just as this read gave up: pass it on.
                handed = waiter.result()
                if handed is not None:
                    self._release(handed)
                else:
                    self._free_slot()
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if isinstance(error, TimeoutError):
                raise PoolTimeoutError(
                    f"no connection for a read became free within {self._timeout:g} s ({self._size} in use)"
                ) from None
            raise

    def _hand_over(self, connection: _Connection | None) -> bool:
        """Give `connection` (None: a slot) to the oldest waiting read; False if none waits."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return True
        return False

    def _free_slot(self) -> None:
        """A connection is gone: a waiting read may open one in its place."""
        if not self._hand_over(None):
            self._count -= 1

    async def _connect_in_slot(self) -> _Connection:
        try:
            return await self._connect()
        except BaseException:
            self._free_slot()
            raise

    def _release(self, connection: _Connection) -> None:
        if self._closed or time.monotonic() - connection.created > self._recycle:
            connection.raw.close()
            self._free_slot()
            return
        connection.idle_since = time.monotonic()
        if not self._hand_over(connection):
            self._idle.append(connection)

    def _discard(self, connection: _Connection, disconnected: bool) -> None:
        """Drop a connection a read failed on, was cancelled on or gave up on.

        A statement may still be running on it: the cancel request asks PostgreSQL
        to stop it (else a dropped connection's backend would run it to the end),
        from a cancel thread, since it waits as long as the database does not answer.
        """
        self._free_slot()
        raw = connection.raw
        busy = not raw.closed and raw.isexecuting()
        if busy:
            request = CancelRequest.of(raw)
            raw.close()
            if request is not None:
                with contextlib.suppress(RuntimeError):  # the process is stopping
                    self._cancel_executor.submit(request.send)
        else:
            raw.close()
        if disconnected:
            self._discard_idle()

    def _discard_idle(self) -> None:
        """The database restarted or dropped us: the idle connections are as dead as this one."""
        while self._idle:
            self._idle.pop().raw.close()
            self._free_slot()

    async def _usable(self, connection: _Connection) -> bool:
        """False (and the connection dropped) if it is too old, or idle long enough to
        be pinged and the ping fails."""
        now = time.monotonic()
        if now - connection.created > self._recycle:
            connection.raw.close()
            self._free_slot()
            return False
        if self._pre_ping_idle_s is None or now - connection.idle_since < self._pre_ping_idle_s:
            return True
        try:
            connection.raw.cursor().execute("SELECT 1")
            await _wait(connection.raw, self._connect_timeout)
            return True
        except (psycopg2.Error, TimeoutError) as error:
            log.info("a pooled read connection failed its idle pre-ping: %s", first_line(error))
            self._discard(connection, self._is_disconnect(error, connection.raw))
            return False
        except BaseException:
            self._discard(connection, False)
            raise

    async def _connect(self) -> _Connection:
        raw = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                raw = await asyncio.get_running_loop().run_in_executor(
                    self._connect_executor, lambda: psycopg2.connect(**self._params, async_=True)
                )
                await _wait(raw)
            psycopg2.extras.register_uuid(conn_or_curs=raw)
        except BaseException as error:
            if raw is not None:
                raw.close()
            if isinstance(error, TimeoutError):
                error = psycopg2.OperationalError(f"connecting timed out after {self._connect_timeout:g} s")
            if isinstance(error, psycopg2.Error):
                # As SQLAlchemy's pool reports a failed connect (not "invalidated": no retry).
                raise DBAPIError.instance(None, None, error, psycopg2.Error) from None
            raise
        return _Connection(raw)

    # --- errors -----------------------------------------------------------------------------

    def _is_disconnect(self, error: BaseException, raw: Any) -> bool:
        return isinstance(error, psycopg2.Error) and self._dialect.is_disconnect(error, raw, None)

    def close(self) -> None:
        """Close the idle connections now, and every lent one as it comes back."""
        self._closed = True
        while self._idle:
            self._count -= 1
            self._idle.pop().raw.close()
        self._connect_executor.shutdown(wait=False, cancel_futures=True)


async def _wait(raw: Any, timeout: float | None = None) -> None:
    """Until `raw`'s pending connect or query is done; TimeoutError after `timeout` seconds.

    The loop watches the socket: nothing blocks while PostgreSQL works.
    """
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        while True:
            state = raw.poll()
            if state == psycopg2.extensions.POLL_OK:
                return
            ready: asyncio.Future[None] = loop.create_future()
            socket = raw.fileno()
            if state == psycopg2.extensions.POLL_READ:
                loop.add_reader(socket, _set_done, ready)
                remove: Callable[[int], bool] = loop.remove_reader
            else:
                loop.add_writer(socket, _set_done, ready)
                remove = loop.remove_writer
            try:
                await ready
            finally:
                remove(socket)


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
