"""Prometheus metrics, served over HTTP on METRICS_PORT (separate from the gRPC port).

Per call, as go-grpc-prometheus writes them, so its dashboards and alerts work
unchanged: grpc_server_started_total, grpc_server_handled_total{grpc_code} with
the code in Go's spelling (`OK`, `NotFound`, `DeadlineExceeded`: grpc-go's
codes.Code.String(), not Python's NOT_FOUND), grpc_server_handling_seconds
(histogram); and adaccounts_rpcs_in_flight. No `*_created` series: the Go
client does not write them, and they double the series of every counter and
histogram for a value (the process start, near enough) nobody asked for.
Read at each scrape: the connection pool (size, checked out), the
health status, and the concurrency limit. Observed by the health monitor's
pings: adaccounts_db_ping_seconds. Label values are method and status names
only: nothing a caller sends, no token, no URL.

Each App has its own registry, so several servers in one process (the tests)
never share or collide on metrics; the `_created` series are left out by that
registry, not by prometheus_client's process-wide switch.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, NamedTuple

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, RestrictedRegistry

from . import logs

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from .db import Database
    from .replicas import ReplicatedDatabase

log = logging.getLogger(__name__)

# Calls take milliseconds; the tail (pool waits, statement timeouts) seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PING_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


# grpc-go's codes.Code.String(), which go-grpc-prometheus writes as grpc_code.
GO_CODE_NAMES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}
# Metric types that prometheus_client gives a `<name>_created` sample.
_WITH_CREATED = frozenset({"counter", "histogram", "summary", "gaugehistogram"})


def split_method(method: str) -> tuple[str, str]:
    """`/pkg.Service/Method` → (`pkg.Service`, `Method`)."""
    service, _, name = method.lstrip("/").partition("/")
    return service, name


class _MethodSeries(NamedTuple):
    """One method's per-call series (prometheus_client's labelled children)."""

    started: Counter
    in_flight: Gauge
    latency: Histogram
    handled: dict[grpc.StatusCode, Counter]  # by status code, filled as codes occur


class Metrics:
    def __init__(self) -> None:
        self.registry: CollectorRegistry = _NoCreatedRegistry()
        labels = ("grpc_type", "grpc_service", "grpc_method")
        self._started = Counter("grpc_server_started", "RPCs started on the server.", labels, registry=self.registry)
        self._handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by status code.",
            (*labels, "grpc_code"),
            registry=self.registry,
        )
        self._latency = Histogram(
            "grpc_server_handling_seconds",
            "Time from the call's arrival to its status, per method.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._in_flight = Gauge(
            "adaccounts_rpcs_in_flight",
            "Unary calls in progress.",
            ("grpc_service", "grpc_method"),
            registry=self.registry,
        )
        self._ping = Histogram(
            "adaccounts_db_ping_seconds",
            "Health monitor's database ping (on a connection of its own), when it answers.",
            buckets=PING_BUCKETS,
            registry=self.registry,
        )
        self._series: dict[str, _MethodSeries] = {}
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # --- per call, from the interceptor ----------------------------------------------------

    def call_started(self, method: str) -> None:
        series = self._series.get(method) or self._new_series(method)
        series.started.inc()
        series.in_flight.inc()

    def call_ended(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        series = self._series.get(method) or self._new_series(method)
        series.in_flight.dec()
        handled = series.handled.get(code)
        if handled is None:
            service, name = split_method(method)
            handled = series.handled[code] = self._handled.labels(
                "unary", service, name, GO_CODE_NAMES.get(code, "Unknown")
            )
        handled.inc()
        series.latency.observe(seconds)

    def _new_series(self, method: str) -> _MethodSeries:
        """A method's labelled series, looked up once: `labels()` on every call took three
        times the event loop's time of the counting itself (docs/benchmarks.md)."""
        service, name = split_method(method)
        series = self._series[method] = _MethodSeries(
            self._started.labels("unary", service, name),
            self._in_flight.labels(service, name),
            self._latency.labels("unary", service, name),
            {},
        )
        return series

    def ping_answered(self, seconds: float) -> None:
        self._ping.observe(seconds)

    # --- read at scrape time -----------------------------------------------------------------

    def watch(self, collect: Callable[[], Iterator[Metric]]) -> None:
        """Register gauges computed at each scrape."""
        self.registry.register(_Callback(collect))

    # --- the HTTP endpoint -------------------------------------------------------------------

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics endpoint on its own thread; returns the bound port."""
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as error:
            raise OSError(f"cannot serve metrics on {host}:{port}: {error.strerror or error}") from None
        return int(self._server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _NoCreatedRegistry(CollectorRegistry):
    """A registry whose scrapes leave out the `<name>_created` samples, in the Prometheus
    text and the OpenMetrics format alike, `?name[]=` scrapes included. prometheus_client's
    own switch (disable_created_metrics, PROMETHEUS_DISABLE_CREATED_SERIES) is process-wide;
    this is this registry's alone."""

    def collect(self) -> Iterator[Metric]:
        return _without_created(super().collect())

    def restricted_registry(self, names: Iterable[str]) -> RestrictedRegistry:
        return _NoCreatedRestrictedRegistry(names, self)


class _NoCreatedRestrictedRegistry(RestrictedRegistry):
    """What CollectorRegistry.restricted_registry returns, its scrapes without `<name>_created`."""

    def collect(self) -> Iterator[Metric]:
        return _without_created(super().collect())


def _without_created(families: Iterable[Metric]) -> Iterator[Metric]:
    for family in families:
        if family.type in _WITH_CREATED:
            created = family.name + "_created"
            kept = [sample for sample in family.samples if sample.name != created]
            if len(kept) != len(family.samples):
                family = copy.copy(family)  # the collector's own object stays as it was
                family.samples = kept
        yield family


class _Callback(Collector):
    def __init__(self, collect: Callable[[], Iterator[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._collect()
        except Exception as error:  # a scrape must never take the server down
            log.warning("metrics: reading the gauges failed: %s", type(error).__name__)


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def server_gauges(database: Database, serving: Callable[[], bool], max_rpcs: int) -> Iterator[Metric]:
    """The pool's and the health monitor's state as it is now."""
    yield gauge("adaccounts_db_pool_size", "Connections the pool keeps (DB_POOL_SIZE).", database.pool_size)
    yield gauge("adaccounts_db_pool_checked_out", "Connections lent out right now.", database.checked_out())
    yield gauge("adaccounts_health_serving", "1 while readiness is SERVING, else 0.", 1 if serving() else 0)
    yield gauge("adaccounts_max_concurrent_rpcs", "Calls in progress past which calls are shed.", max_rpcs)
    yield CounterMetricFamily(
        "adaccounts_log_lines_dropped",
        "Log lines dropped because the log output was not read fast enough.",
        value=logs.dropped_lines(),
    )


def replica_metrics(database: ReplicatedDatabase) -> Iterator[Metric]:
    """Where reads went and what is known of each replica (with DATABASE_REPLICA_URLS). The
    targets are named by role (primary, replica-N: the Nth URL), never by address."""
    reads = CounterMetricFamily(
        "adaccounts_db_reads", "Reads served, by database: the primary or a replica.", labels=("target",)
    )
    reads.add_metric(("primary",), database.primary_reads)
    for replica in database.replicas:
        reads.add_metric((replica.name,), replica.reads)
    yield reads
    fallbacks = CounterMetricFamily(
        "adaccounts_db_replica_fallbacks",
        "Reads served by the primary although replicas are configured, by why: none_in_rotation (every replica"
        " down, stalled or staler than REPLICA_MAX_LAG_S), token (none has replayed the caller's consistency"
        " token yet), failed (the replica chosen failed or did not answer in time).",
        labels=("reason",),
    )
    for reason in ("none_in_rotation", "token", "failed"):
        fallbacks.add_metric((reason,), database.fallbacks[reason])
    yield fallbacks
    lag = GaugeMetricFamily(
        "adaccounts_db_replica_lag_seconds",
        "How stale each replica may be, as this worker last measured it (absent until measured).",
        labels=("target",),
    )
    rotation = GaugeMetricFamily(
        "adaccounts_db_replica_in_rotation",
        "1 while the replica answers and is within REPLICA_MAX_LAG_S, so it serves reads; else 0.",
        labels=("target",),
    )
    for replica in database.replicas:
        seconds = database.lag_s(replica)
        if seconds is not None:
            lag.add_metric((replica.name,), seconds)
        rotation.add_metric((replica.name,), 1 if database.in_rotation(replica) else 0)
    yield lag
    yield rotation
