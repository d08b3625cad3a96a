"""Build, start and stop the server; run it until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import logs
from .config import Settings
from .db import safe_url
from .guard import Authenticator, CallGuard
from .health import DatabaseMonitor
from .metrics import Metrics, replica_metrics, server_gauges
from .migrate import upgrade_to_head
from .page_tokens import PageTokens
from .replicas import ReplicatedDatabase, open_database
from .repository import AdAccountRepository
from .service import SERVICE_NAME, AdAccountService, rpc_handlers
from .tls import server_credentials
from .tracing import Tracing

log = logging.getLogger(__name__)

# What stop() leaves to gRPC itself once our own drain is over: long-lived
# health Watch streams are cancelled, nothing else should still be running.
_FINAL_STOP_GRACE_S = 1.0
# How long calls on a connection past GRPC_MAX_CONNECTION_AGE_S may take to finish.
_CONNECTION_AGE_GRACE_S = 30.0
_KEEPALIVE_TIME_MS = 60_000
_KEEPALIVE_TIMEOUT_MS = 20_000
# The plaintext health-only port (GRPC_HEALTH_PORT) reads nothing but small health requests.
_HEALTH_MAX_MESSAGE_BYTES = 1024
_HEALTH_MAX_CONCURRENT_STREAMS = 16
# How long calls cut short at the end of the grace may take to send their UNAVAILABLE.
_CUT_SHORT_WAIT_S = 1.0
# How often request ids older than REQUEST_ID_RETENTION_S are forgotten.
_FORGET_REQUESTS_INTERVAL_S = 60.0


def register_service(server: grpc.aio.Server, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]) -> None:
    """AdAccountService's handlers, as generic handlers: GetAdAccount measured faster this way
    than through add_registered_method_handlers (docs/decisions/0008)."""
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


class App:
    """One server process: the database and its pool, the gRPC server, the health monitor."""

    def __init__(self, settings: Settings, *, reuse_port: bool = False) -> None:
        self.settings = settings
        self.reuse_port = reuse_port
        logs.quiet_grpc_core()
        self.database = open_database(settings)
        self.repository = AdAccountRepository(self.database)
        self.service = AdAccountService(self.repository, PageTokens(*settings.page_token_keys))
        self._forgetting: asyncio.Task[None] | None = None
        self.monitor = DatabaseMonitor(self.database, settings.HEALTH_CHECK_INTERVAL_S, settings.HEALTH_CHECK_TIMEOUT_S)
        self.tracing = Tracing(settings) if settings.TRACING != "off" else None
        if self.tracing is not None:
            self.database.trace(self.tracing.sql_tracer())
        self.metrics: Metrics | None = None
        self.metrics_port: int | None = None
        if settings.METRICS_PORT is not None:
            self.metrics = Metrics()
            self.monitor.on_ping = self.metrics.ping_answered
            self.metrics.watch(
                lambda: server_gauges(self.database, lambda: self.monitor.serving, settings.MAX_CONCURRENT_RPCS)
            )
            database = self.database
            if isinstance(database, ReplicatedDatabase):
                self.metrics.watch(lambda: replica_metrics(database))
        self.guard = CallGuard(
            Authenticator(settings.auth_tokens),
            self.metrics,
            max_concurrent_rpcs=settings.MAX_CONCURRENT_RPCS,
            client_certificates=settings.GRPC_TLS == "mtls",
        )
        self.server: grpc.aio.Server | None = None
        self.health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None
        self.port = 0
        # What start() took, released (last taken, first released) by stop(), or by start()
        # itself when it fails part-way.
        self._taken = AsyncExitStack()

    def _build_server(self) -> grpc.aio.Server:
        server = grpc.aio.server(
            # Tracing's interceptor runs before the guard, so the call's span covers everything else.
            interceptors=[self.tracing.interceptor] if self.tracing is not None else None,
            options=[
                # Share the port only among `--workers` processes, never with another server by accident.
                ("grpc.so_reuseport", 1 if self.reuse_port else 0),
                # A connection sticks to the process that accepted it: closing it now and then
                # (gracefully, after GOAWAY) lets clients rebalance over workers and new pods.
                ("grpc.max_connection_age_ms", round(self.settings.GRPC_MAX_CONNECTION_AGE_S * 1000)),
                ("grpc.max_connection_age_grace_ms", round(_CONNECTION_AGE_GRACE_S * 1000)),
                ("grpc.max_receive_message_length", self.settings.GRPC_MAX_REQUEST_BYTES),
                ("grpc.max_send_message_length", self.settings.GRPC_MAX_MESSAGE_BYTES),
                # One connection cannot take every call slot for itself.
                ("grpc.max_concurrent_streams", self.settings.GRPC_MAX_CONCURRENT_STREAMS),
                # Refuse a stream only past that limit as the caller counts it: with gRPC's "overload
                # protection" the server also counted streams whose answers were still being sent,
                # and refused calls the client had every right to start (REFUSED_STREAM).
                ("grpc.http.overload_protection", 0),
                # Notice a caller that vanished (host down, process stopped) and release what its
                # calls hold, unsent responses included: a ping every minute, 20 s to answer it.
                ("grpc.keepalive_time_ms", _KEEPALIVE_TIME_MS),
                ("grpc.keepalive_timeout_ms", _KEEPALIVE_TIMEOUT_MS),
                ("grpc.http2.max_pings_without_data", 0),
            ],
        )
        register_service(server, rpc_handlers(self.service, self.guard.wrap))
        health_pb2_grpc.add_HealthServicer_to_server(self.monitor.servicer, server)
        if self.settings.GRPC_REFLECTION:
            reflection.enable_server_reflection(
                (
                    SERVICE_NAME,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                ),
                server,
            )
        return server

    def _build_health_server(self) -> grpc.aio.Server:
        """grpc.health.v1 alone, in plaintext: for probes that cannot do TLS. It answers
        from the same statuses as the main port and exposes nothing else."""
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 1 if self.reuse_port else 0),
                # Health requests are a service name: nothing bigger is ever read on this port.
                ("grpc.max_receive_message_length", _HEALTH_MAX_MESSAGE_BYTES),
                ("grpc.max_concurrent_streams", _HEALTH_MAX_CONCURRENT_STREAMS),
            ]
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.monitor.servicer, server)
        return server

    async def start(self) -> int:
        """Bind, start serving and start the health monitor; returns the bound port. A start
        that fails part-way releases what it had taken before it raises."""
        async with AsyncExitStack() as taken:
            await self._start(taken)
            self._taken = taken.pop_all()
        return self.port

    async def _start(self, taken: AsyncExitStack) -> None:
        settings = self.settings
        if self.tracing is not None:
            taken.callback(self.tracing.stop)
        self.server = self._build_server()
        log.info("database: %s", safe_url(self.database.url))
        if isinstance(self.database, ReplicatedDatabase):
            log.info(
                "read replicas: %d (DATABASE_REPLICA_URLS), serving reads within REPLICA_MAX_LAG_S=%g s",
                len(self.database.replicas),
                settings.REPLICA_MAX_LAG_S,
            )
        if self.metrics is not None:
            self.metrics_port = self.metrics.serve(settings.GRPC_HOST, settings.METRICS_PORT or 0)
            taken.callback(self.metrics.stop)
            log.info("metrics on http://%s:%d/metrics", settings.GRPC_HOST, self.metrics_port)
        if self.database.is_sqlite:
            # The embedded default: bring the file to the current schema with the
            # same migrations as PostgreSQL. PostgreSQL is never migrated here.
            await asyncio.to_thread(upgrade_to_head, self.database.url)
        await self.database.open()
        taken.push_async_callback(lambda: self.database.close())  # looked up when released
        # Forgets request ids past REQUEST_ID_RETENTION_S; cancelled before the database closes.
        self._forgetting = asyncio.create_task(self._forget_requests(), name="forget-request-ids")
        taken.push_async_callback(_cancel, self._forgetting)
        # Publish NOT_SERVING before the port opens: gRPC's health servicer
        # would otherwise answer SERVING for "" until the first ping.
        await self.monitor.start()
        taken.push_async_callback(self.monitor.stop)
        # The ports last: gRPC keeps a port bound by a server that never started until the
        # process exits, whatever stop() does.
        self.port = _bind(self.server, f"{settings.GRPC_HOST}:{settings.GRPC_PORT}", server_credentials(settings))
        taken.push_async_callback(self.server.stop, 0)
        if settings.GRPC_HEALTH_PORT is not None:
            self.health_server = self._build_health_server()
            self.health_port = _bind(self.health_server, f"{settings.GRPC_HOST}:{settings.GRPC_HEALTH_PORT}", None)
            taken.push_async_callback(self.health_server.stop, 0)
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
            log.info("health only, plaintext, on %s:%d", settings.GRPC_HOST, self.health_port)
        log.info(
            "serving adaccounts.v1 on %s:%d, %s (database pool %d)",
            settings.GRPC_HOST,
            self.port,
            {"off": "plaintext (GRPC_TLS=off)", "tls": "TLS", "mtls": "mutual TLS"}[settings.GRPC_TLS],
            self.database.pool_size,
        )

    async def stop(self) -> None:
        """NOT_SERVING, refuse new calls, let calls in progress finish, then release everything."""
        grace = self.settings.SHUTDOWN_GRACE_S
        started = time.monotonic()
        log.info("shutting down: finishing %d call(s) in progress (grace %g s)", self.guard.in_flight, grace)
        await self.monitor.stop()
        # gRPC's own stop(grace) resets calls it accepted but had not yet handed
        # to a handler (grpc/grpc#41785), so drain at our level first: new calls
        # get a clean UNAVAILABLE while the ones in progress finish.
        self.guard.start_draining()
        if not await self.guard.wait_idle(grace):
            log.warning("grace period over: cancelling %d call(s) still in progress", self.guard.in_flight)
            self.guard.cut_short()
            await self.guard.wait_idle(_CUT_SHORT_WAIT_S)
        remaining = max(0.0, grace - (time.monotonic() - started))
        if self.server is not None:
            await self.server.stop(min(remaining, _FINAL_STOP_GRACE_S))
        # The rest, last taken first: the health port, the gRPC port and the monitor (stopped
        # already), the request-id forgetting, the database, metrics, tracing.
        await self._taken.aclose()
        log.info("stopped")

    async def _forget_requests(self) -> None:
        """Once a minute, forget the request ids older than REQUEST_ID_RETENTION_S (every worker
        does; they share the work). Skipped while the database is not SERVING (down, or its
        schema behind); a failure is one WARNING naming its type, never its message (SQL)."""
        retention = timedelta(seconds=self.settings.REQUEST_ID_RETENTION_S)
        while True:
            await asyncio.sleep(_FORGET_REQUESTS_INTERVAL_S)
            if not self.monitor.serving:
                continue
            try:
                forgotten = await self.repository.forget_requests(datetime.now(UTC) - retention)
            except Exception as error:
                log.warning("forgetting old request ids failed (%s); retrying in a minute", type(error).__name__)
                continue
            if forgotten:
                log.info("forgot %d request id(s) older than REQUEST_ID_RETENTION_S", forgotten)

    async def run_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop gracefully."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await self.start()
        await stop.wait()
        await self.stop()


def serve(settings: Settings, *, reuse_port: bool = False) -> None:
    asyncio.run(App(settings, reuse_port=reuse_port).run_until_signalled())


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.wait([task])


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError as error:
        raise OSError(f"cannot listen on {address}: {error}") from None
