"""The database monitor that drives grpc.health.v1 statuses.

Probes read a status from memory (the HealthServicer answers on the event
loop), so a probe never waits on the database. The monitor pings the database
(`SELECT 1` on a connection of its own, outside the pool, so that calls holding
every pooled connection never read as a database that is down) every
HEALTH_CHECK_INTERVAL_S: a ping that fails, or does not answer within
HEALTH_CHECK_TIMEOUT_S, marks the database-backed services NOT_SERVING; the next
good ping marks them SERVING.

The monitor also checks the schema: the database's alembic revision
against the one this code expects (migrate.head_revision). A database behind
the code (not migrated yet) keeps the database-backed services NOT_SERVING,
logging once that `adaccounts migrate` must run; the server never migrates
PostgreSQL itself. A database ahead of the code (a revision this code does not
know: a newer release migrated it, then the app was rolled back) stays SERVING,
because migrations are expand/contract (docs/deploying.md, "Migration policy"). The check runs
after the first good ping, after every ping while the schema is not right,
whenever the database comes back after a failure, and every
SCHEMA_RECHECK_PINGS pings otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2

from .db import Database, DatabaseError
from .migrate import SchemaState, head_revision
from .service import SERVICE_NAME

if TYPE_CHECKING:
    _Context = grpc.aio.ServicerContext[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]

    class _AsyncHealthServicer:
        """gRPC's asyncio health servicer, as this module uses it: grpc-stubs types only the
        synchronous one (and gRPC's own annotations have Check return None)."""

        async def Check(
            self, request: health_pb2.HealthCheckRequest, context: _Context
        ) -> health_pb2.HealthCheckResponse: ...
        async def Watch(self, request: health_pb2.HealthCheckRequest, context: _Context) -> None: ...
        async def set(self, service: str, status: int) -> None: ...
        async def enter_graceful_shutdown(self) -> None: ...

else:
    from grpc_health.v1.health import aio as _health_aio

    _AsyncHealthServicer = _health_aio.HealthServicer

log = logging.getLogger(__name__)

SERVING: int = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: int = health_pb2.HealthCheckResponse.NOT_SERVING

# SERVING only while the database answers: what readiness probes ask.
DATABASE_BACKED_SERVICES = ("", "readiness", SERVICE_NAME)
# SERVING while the process answers at all: what liveness probes ask.
LIVENESS_SERVICE = "liveness"
# While the schema is right, look again every this many good pings (about a minute at the default interval).
SCHEMA_RECHECK_PINGS = 60
# Health requests are tiny: a service name is a few dozen bytes. Watch streams are long-lived,
# so each open one holds memory until its caller closes it: few per connection, few in all.
MAX_SERVICE_NAME_BYTES = 256
MAX_WATCHES_PER_CONNECTION = 8
MAX_WATCHES = 256


class HealthServicer(_AsyncHealthServicer):
    """gRPC's asyncio health servicer, bounded against hostile callers (health needs no token).

    A service name longer than MAX_SERVICE_NAME_BYTES is INVALID_ARGUMENT; a Watch beyond
    MAX_WATCHES_PER_CONNECTION on one connection, or MAX_WATCHES in all, is RESOURCE_EXHAUSTED;
    a Watch of a service this server does not report gets SERVICE_UNKNOWN and is held open
    without being remembered by name (gRPC's servicer keeps a condition per watched name).
    """

    def __init__(self, known: frozenset[str]) -> None:
        super().__init__()
        self._known = known
        self._watches: Counter[str] = Counter()  # open Watch streams per connection (peer)

    async def Check(self, request: health_pb2.HealthCheckRequest, context: _Context) -> health_pb2.HealthCheckResponse:
        await _refuse_long_names(request, context)
        return await super().Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: _Context) -> None:
        await _refuse_long_names(request, context)
        peer = context.peer()
        if self._watches[peer] >= MAX_WATCHES_PER_CONNECTION or self._watches.total() >= MAX_WATCHES:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many health Watch streams open (at most {MAX_WATCHES_PER_CONNECTION} per connection, "
                f"{MAX_WATCHES} in all); close some, or use Check",
            )
        self._watches[peer] += 1
        try:
            if request.service in self._known:
                await super().Watch(request, context)
            else:
                await context.write(
                    health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                )
                await asyncio.Event().wait()  # until the caller closes the stream or the server stops
        finally:
            self._watches[peer] -= 1
            if not self._watches[peer]:
                del self._watches[peer]


async def _refuse_long_names(request: health_pb2.HealthCheckRequest, context: _Context) -> None:
    if len(request.service.encode()) > MAX_SERVICE_NAME_BYTES:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"service: at most {MAX_SERVICE_NAME_BYTES} bytes (a service name)"
        )


class DatabaseMonitor:
    def __init__(self, database: Database, interval: float, timeout: float) -> None:
        self.servicer = HealthServicer(frozenset((*DATABASE_BACKED_SERVICES, LIVENESS_SERVICE)))
        self._database = database
        self._interval = interval
        self._timeout = timeout
        self._status: int | None = None
        self._cause: str | None = None  # what the last log line was about
        self._schema: SchemaState | None = None
        self._pings_since_schema_check = 0
        self._task: asyncio.Task[None] | None = None
        self._ping: asyncio.Task[None] | None = None  # a ping still waiting for its answer
        self._stopping = asyncio.Event()
        # Told how long each ping that answered took (the metrics' ping latency), when set.
        self.on_ping: Callable[[float], None] | None = None

    async def start(self) -> None:
        await self.servicer.set(LIVENESS_SERVICE, SERVING)
        for service in DATABASE_BACKED_SERVICES:  # until the first ping answers
            await self.servicer.set(service, NOT_SERVING)
        self._task = asyncio.create_task(self._run(), name="database-monitor")

    async def stop(self) -> None:
        """Report NOT_SERVING everywhere for good (shutdown) and stop pinging."""
        await self.servicer.enter_graceful_shutdown()
        self._stopping.set()
        for task in (self._task, self._ping):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    @property
    def serving(self) -> bool:
        return self._status == SERVING

    async def _run(self) -> None:
        while not self._stopping.is_set():
            await self.check_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval)

    async def check_once(self) -> None:
        started = time.perf_counter()
        if self._ping is None:
            # The ping runs as a task of its own, never cancelled at the timeout (a driver may
            # take long to give up on a stalled server): the next check waits on the same one.
            self._ping = asyncio.create_task(self._database.ping(self._timeout), name="database-ping")
        done, _ = await asyncio.wait([self._ping], timeout=self._timeout)
        if not done:
            await self._publish(NOT_SERVING, f"database did not answer a ping within {self._timeout:g} s")
            return
        ping, self._ping = self._ping, None
        try:
            ping.result()
        except Exception as error:
            self._schema = None  # check again once the database is back: it may have been restored or replaced
            await self._publish(NOT_SERVING, f"database unreachable: {_gist(error)}")
            return
        if self.on_ping is not None:
            self.on_ping(time.perf_counter() - started)
        self._pings_since_schema_check += 1
        schema = self._schema
        if (
            schema is None
            or not schema.serving  # look again every ping: `adaccounts migrate` may just have run
            or self._pings_since_schema_check >= SCHEMA_RECHECK_PINGS
        ):
            try:
                schema = SchemaState(await self._database.schema_revisions(self._timeout), head_revision())
            except Exception as error:  # e.g. a role that may not read alembic_version
                self._schema = None
                await self._publish(
                    NOT_SERVING, f"cannot read the database's schema revision: {_gist(error)}", cause="schema"
                )
                return
            self._schema = schema
            self._pings_since_schema_check = 0
        if schema.at_head:
            await self._publish(SERVING, "database reachable")
        else:
            await self._publish(SERVING if schema.serving else NOT_SERVING, schema.reason, cause=schema.reason)

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


def _gist(error: Exception) -> str:
    """Our own database errors say what happened without a host or SQL; others only their type."""
    return str(error) if isinstance(error, DatabaseError) else type(error).__name__
