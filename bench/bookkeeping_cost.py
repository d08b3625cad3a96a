"""What the call guard's per-call bookkeeping costs the event loop's thread: the metrics of a
call and its log line, each done the way the guard does it and the plain way, in one run.

    python bench/bookkeeping_cost.py [--calls 3000] [--rounds 5]

Metrics: the guard's series looked up once per method (metrics.Metrics) against
prometheus_client's `labels(...)` on every call. Log line: a record made with
`Logger.makeRecord` and handed to `Logger.handle` (guard._log) against `Logger.log`, which first
walks the stack for the caller's file and line; both through the server's own handler (JSON, to
/dev/null), whose writer thread formats the lines. CPU time of this thread only, best of the
rounds (the figure least disturbed by the machine's other work).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable

import grpc
from adaccounts_server import logs
from adaccounts_server.metrics import LATENCY_BUCKETS, Metrics, split_method
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

METHOD = "/adaccounts.v1.AdAccountService/GetAdAccount"
FORMAT = "%s %s %.1f ms caller=%s peer=%s request_id=%s%s"
ARGUMENTS = (METHOD, "OK", 1.234, "-", "ipv4:127.0.0.1:50000", "0" * 32, "")
FIELDS = {"method": METHOD, "code": "OK", "duration_ms": 1.234, "peer": ARGUMENTS[4], "caller": "-"}


def labels_each_call() -> Callable[[], None]:
    registry = CollectorRegistry()
    labels = ("grpc_type", "grpc_service", "grpc_method")
    started = Counter("started", "", labels, registry=registry)
    handled = Counter("handled", "", (*labels, "grpc_code"), registry=registry)
    latency = Histogram("latency", "", labels, buckets=LATENCY_BUCKETS, registry=registry)
    in_flight = Gauge("in_flight", "", ("grpc_service", "grpc_method"), registry=registry)

    def call() -> None:
        service, name = split_method(METHOD)
        started.labels("unary", service, name).inc()
        in_flight.labels(service, name).inc()
        service, name = split_method(METHOD)
        in_flight.labels(service, name).dec()
        handled.labels("unary", service, name, "OK").inc()
        latency.labels("unary", service, name).observe(0.001)

    return call


def series_once() -> Callable[[], None]:
    metrics = Metrics()

    def call() -> None:
        metrics.call_started(METHOD)
        metrics.call_ended(METHOD, grpc.StatusCode.OK, 0.001)

    return call


def logger_log(log: logging.Logger) -> Callable[[], None]:
    return lambda: log.log(logging.INFO, FORMAT, *ARGUMENTS, extra={"rpc": FIELDS})


def record_handed(log: logging.Logger) -> Callable[[], None]:
    def call() -> None:
        record = log.makeRecord(log.name, logging.INFO, __file__, 0, FORMAT, ARGUMENTS, None, "call", {"rpc": FIELDS})
        log.handle(record)

    return call


def cost_us(call: Callable[[], None], calls: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.thread_time()
        for _ in range(calls):
            call()
        best = min(best, (time.thread_time() - started) / calls * 1e6)
        time.sleep(0.3)  # the log writer empties its queue (bounded) between rounds
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000, help="calls per round (the log queue holds 10,000)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    logs.configure("INFO", "json", open(os.devnull, "w"))  # noqa: SIM115 - open for the process's life
    log = logging.getLogger("adaccounts_server.rpc")
    for what, plain, guards in (
        ("metrics", labels_each_call(), series_once()),
        ("log line", logger_log(log), record_handed(log)),
    ):
        before = cost_us(plain, args.calls, args.rounds)
        after = cost_us(guards, args.calls, args.rounds)
        print(f"{what:9s} plain {before:5.2f} us  guard's way {after:5.2f} us  ({after / before:.2f})")


if __name__ == "__main__":
    main()
