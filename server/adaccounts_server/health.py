"""The database monitor that drives grpc.health.v1 statuses.

Probes read a status from memory (the HealthServicer answers on the event
loop), so a probe never waits on the database. The monitor pings the database
(`SELECT 1` through the pool) on its own thread every HEALTH_CHECK_INTERVAL_S:
a ping that fails, or does not answer within HEALTH_CHECK_TIMEOUT_S, marks the
database-backed services NOT_SERVING; the next good ping marks them SERVING.
A stalled ping is never stacked: the monitor waits for it rather than
starting another one on a new thread.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Future, ThreadPoolExecutor

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from .db import Database
from .errors import first_line
from .service import SERVICE_NAME

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# SERVING only while the database answers: what readiness probes ask.
DATABASE_BACKED_SERVICES = ("", "readiness", SERVICE_NAME)
# SERVING while the process answers at all: what liveness probes ask.
LIVENESS_SERVICE = "liveness"


class DatabaseMonitor:
    def __init__(self, database: Database, interval: float, timeout: float) -> None:
        self.servicer = health_aio.HealthServicer()
        self._database = database
        self._interval = interval
        self._timeout = timeout
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="db-ping")
        self._ping: Future[None] | None = None
        self._status: int | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.servicer.set(LIVENESS_SERVICE, SERVING)
        for service in DATABASE_BACKED_SERVICES:  # until the first ping answers
            await self.servicer.set(service, NOT_SERVING)
        self._task = asyncio.create_task(self._run(), name="database-monitor")

    async def stop(self) -> None:
        """Report NOT_SERVING everywhere for good (shutdown) and stop pinging."""
        await self.servicer.enter_graceful_shutdown()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._thread.shutdown(wait=False, cancel_futures=True)

    @property
    def serving(self) -> bool:
        return self._status == SERVING

    async def _run(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self._interval)

    async def check_once(self) -> None:
        if self._ping is None:
            self._ping = self._thread.submit(self._database.ping)
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._ping)), self._timeout)
        except TimeoutError:
            await self._publish(NOT_SERVING, f"database did not answer a ping within {self._timeout:g} s")
            return  # keep waiting on the same ping next time
        except Exception as error:
            self._ping = None
            await self._publish(NOT_SERVING, f"database unreachable: {first_line(error)}")
            return
        self._ping = None
        await self._publish(SERVING, "database reachable")

    async def _publish(self, status: int, reason: str) -> None:
        # The servicer notifies watchers on every set, so set only on a change.
        if status == self._status:
            return
        self._status = status
        log.log(
            logging.INFO if status == SERVING else logging.WARNING,
            "health: %s (%s)",
            health_pb2.HealthCheckResponse.ServingStatus.Name(status),
            reason,
        )
        for service in DATABASE_BACKED_SERVICES:
            await self.servicer.set(service, status)
