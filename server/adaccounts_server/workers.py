"""`adaccounts serve --workers N`: N server processes sharing one port.

One Python process runs Python code on one core at a time, so on a machine
with several cores one process leaves most of them idle. Workers share the
port with SO_REUSEPORT, the kernel spreading new connections over them (as
gRPC's own multiprocessing example does); a connection then stays with its
worker, which is why servers cap connection age and clients open several.

Each worker is a fresh interpreter (multiprocessing "spawn"): it builds its own
event loop, database pool and gRPC server, so nothing that does not survive a fork
(gRPC's core, database connections) is ever inherited. Each reports its own
health. The supervisor forwards SIGTERM/SIGINT, replaces a worker that dies,
and exits 0 once every worker has stopped.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess

from .config import Settings

log = logging.getLogger(__name__)

# A worker that dies this soon after starting, this many times in a row, is not
# going to come up (bad configuration, port taken): stop instead of looping.
_EARLY_DEATH_S = 10.0
_MAX_EARLY_DEATHS = 5
_RESTART_PAUSE_S = 1.0


def run(settings: Settings, workers: int, configure_logging: Callable[[str, str], None]) -> int:
    """Supervise `workers` server processes until SIGTERM/SIGINT; the exit code."""
    try:
        port = _claim_port(settings.GRPC_HOST, settings.GRPC_PORT)
    except OSError as error:
        log.error("cannot listen on %s:%d: %s", settings.GRPC_HOST, settings.GRPC_PORT, error)
        return 1
    settings = settings.model_copy(update={"GRPC_PORT": port})
    if settings.uses_embedded_database or settings.database_url.get_backend_name() == "sqlite":
        # Migrate the SQLite file once, before the workers race to do it.
        from .migrate import upgrade_to_head

        upgrade_to_head(settings.database_url)

    context = multiprocessing.get_context("spawn")
    stopping = False

    def start(index: int) -> BaseProcess:
        own = settings.model_copy(update={"METRICS_PORT": metrics_port(settings.METRICS_PORT, index)})
        process = context.Process(
            target=_worker_main,
            args=(own, configure_logging),
            name=f"adaccounts-worker-{index}",
            daemon=False,
        )
        process.start()
        return process

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        log.info("signal %s: stopping the workers", signal.Signals(signum).name)
        stopping = True
        for process in running.values():
            if process.pid is not None and process.exitcode is None:
                os.kill(process.pid, signal.SIGTERM)

    running = {index: start(index) for index in range(workers)}
    started = {index: time.monotonic() for index in running}
    early_deaths = 0
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    log.info(
        "supervising %d workers on %s:%d (pids %s)",
        workers,
        settings.GRPC_HOST,
        port,
        ", ".join(str(p.pid) for p in running.values()),
    )

    failed = False
    while running:
        wait([p.sentinel for p in running.values()], timeout=1.0)
        for index, process in list(running.items()):
            if process.exitcode is None:
                continue
            del running[index]
            if stopping:
                if process.exitcode == -signal.SIGTERM:
                    # Killed by the forwarded SIGTERM before it installed its handler,
                    # which it does before it accepts a single call: nothing was lost.
                    log.info("worker %d (pid %s) stopped before it was serving", index, process.pid)
                elif process.exitcode != 0:
                    log.error("worker %d (pid %s) stopped with exit code %s", index, process.pid, process.exitcode)
                    failed = True
                continue
            lived = time.monotonic() - started[index]
            early_deaths = early_deaths + 1 if lived < _EARLY_DEATH_S else 0
            log.error(
                "worker %d (pid %s) died with exit code %s after %.1f s", index, process.pid, process.exitcode, lived
            )
            if early_deaths >= _MAX_EARLY_DEATHS:
                log.error("workers keep dying at start; stopping")
                stop(signal.SIGTERM, None)
                failed = True
                continue
            time.sleep(_RESTART_PAUSE_S)
            if stopping:  # signalled while pausing
                continue
            running[index] = start(index)
            started[index] = time.monotonic()
    log.info("all workers stopped")
    return 1 if failed else 0


def metrics_port(base: int | None, index: int) -> int | None:
    """Where worker `index` serves /metrics: METRICS_PORT + index, one endpoint per worker (the
    Deployment declares each as a container port, the PodMonitor scrapes each); unset stays
    unset, and 0 (any free port) stays 0."""
    return base + index if base else base


def _claim_port(host: str, port: int) -> int:
    """The port the workers will share: free now, without SO_REUSEPORT, so that
    workers never join some other server that happens to hold it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host.strip("[]"), port))
        claimed: int = probe.getsockname()[1]  # (host, port) for IPv4, (host, port, flowinfo, scope_id) for IPv6
        return claimed


def _worker_main(settings: Settings, configure_logging: Callable[[str, str], None]) -> None:
    configure_logging(settings.LOG_LEVEL, settings.LOG_FORMAT)
    _stop_when_orphaned()
    from .app import serve

    serve(settings, reuse_port=True)


def _stop_when_orphaned() -> None:
    """Shut down gracefully if the supervisor vanishes (killed outright, say), instead
    of serving on unsupervised with nobody to stop or replace this worker."""
    supervisor = os.getppid()

    def watch() -> None:
        while os.getppid() == supervisor:
            time.sleep(1.0)
        log.warning("supervisor %d is gone: stopping", supervisor)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()
