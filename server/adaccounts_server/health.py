"""The database monitor that drives grpc.health.v1 statuses.

Probes read a status from memory (the HealthServicer answers on the event
loop), so a probe never waits on the database. The monitor pings the database
(`SELECT 1` through the pool) on its own thread every HEALTH_CHECK_INTERVAL_S:
a ping that fails, or does not answer within HEALTH_CHECK_TIMEOUT_S, marks the
database-backed services NOT_SERVING; the next good ping marks them SERVING.
A stalled ping is never stacked: the monitor waits for it rather than
starting another one on a new thread.

The same thread also checks the schema: the database's alembic revision
against the one this code expects (migrate.head_revision). A database behind
the code (not migrated yet) keeps the database-backed services NOT_SERVING,
logging once that `adaccounts migrate` must run; the server never migrates
PostgreSQL itself. A database ahead of the code (a revision this code does not
know: a newer release migrated it, then the app was rolled back) stays SERVING,
because migrations are expand/contract (README, "Deploying"). The check runs
after the first good ping, after every ping while the schema is not right,
whenever the database comes back after a failure, and every
SCHEMA_RECHECK_PINGS pings otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import Future, ThreadPoolExecutor

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from .db import Database
from .errors import first_line
from .migrate import SchemaState, schema_state
from .service import SERVICE_NAME

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# SERVING only while the database answers: what readiness probes ask.
DATABASE_BACKED_SERVICES = ("", "readiness", SERVICE_NAME)
# SERVING while the process answers at all: what liveness probes ask.
LIVENESS_SERVICE = "liveness"
# While the schema is right, look again every this many good pings (about a minute at the default interval).
SCHEMA_RECHECK_PINGS = 60


class _SchemaUnreadable(Exception):
    pass


class DatabaseMonitor:
    def __init__(self, database: Database, interval: float, timeout: float) -> None:
        self.servicer = health_aio.HealthServicer()
        self._database = database
        self._interval = interval
        self._timeout = timeout
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="db-ping")
        self._ping: Future[SchemaState | None] | None = None
        self._status: int | None = None
        self._cause: str | None = None  # what the last log line was about
        # Touched by the ping thread only: when the schema is next due for a check.
        self._schema: SchemaState | None = None
        self._pings_since_schema_check = 0
        self._task: asyncio.Task[None] | None = None
        # Stopping is a flag, not only a cancel: Python 3.11's wait_for swallows a
        # cancellation that lands as the ping completes, and the loop would run on.
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        await self.servicer.set(LIVENESS_SERVICE, SERVING)
        for service in DATABASE_BACKED_SERVICES:  # until the first ping answers
            await self.servicer.set(service, NOT_SERVING)
        self._task = asyncio.create_task(self._run(), name="database-monitor")

    async def stop(self) -> None:
        """Report NOT_SERVING everywhere for good (shutdown) and stop pinging."""
        await self.servicer.enter_graceful_shutdown()
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._thread.shutdown(wait=False, cancel_futures=True)

    @property
    def serving(self) -> bool:
        return self._status == SERVING

    async def _run(self) -> None:
        while not self._stopping.is_set():
            await self.check_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval)

    async def check_once(self) -> None:
        if self._ping is None:
            self._ping = self._thread.submit(self._probe)
        try:
            schema = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._ping)), self._timeout)
        except TimeoutError:
            await self._publish(NOT_SERVING, f"database did not answer a ping within {self._timeout:g} s")
            return  # keep waiting on the same ping next time
        except _SchemaUnreadable as error:
            self._ping = None
            await self._publish(NOT_SERVING, f"cannot read the database's schema revision: {error}", cause="schema")
            return
        except Exception as error:
            self._ping = None
            await self._publish(NOT_SERVING, f"database unreachable: {first_line(error)}")
            return
        self._ping = None
        if schema is None or schema.at_head:
            await self._publish(SERVING, "database reachable")
        else:
            await self._publish(SERVING if schema.serving else NOT_SERVING, schema.reason, cause=schema.reason)

    def _probe(self) -> SchemaState | None:
        """On the ping thread: `SELECT 1`, then the schema when due (None: unchanged since the last check)."""
        try:
            self._database.ping()
        except BaseException:
            self._schema = None  # check again once the database is back: it may have been restored or replaced
            raise
        self._pings_since_schema_check += 1
        due = (
            self._schema is None
            or not self._schema.serving  # look again every ping: `adaccounts migrate` may just have run
            or self._pings_since_schema_check >= SCHEMA_RECHECK_PINGS
        )
        if due:
            try:
                with self._database.engine.connect() as connection:
                    self._schema = schema_state(connection)
            except Exception as error:  # e.g. a role that may not read alembic_version
                self._schema = None
                raise _SchemaUnreadable(first_line(getattr(error, "orig", None) or error)) from None
            self._pings_since_schema_check = 0
        return self._schema

    async def _publish(self, status: int, reason: str, cause: str = "database") -> None:
        # Log once per change of status, or of what it is about (the database
        # answering or not, the schema); the servicer notifies watchers on
        # every set, so set only on a change of status.
        changed = status != self._status
        if not changed and cause == self._cause:
            return
        self._status, self._cause = status, cause
        log.log(
            logging.INFO if status == SERVING else logging.WARNING,
            "health: %s (%s)",
            health_pb2.HealthCheckResponse.ServingStatus.Name(status),
            reason,
        )
        if changed:
            for service in DATABASE_BACKED_SERVICES:
                await self.servicer.set(service, status)
