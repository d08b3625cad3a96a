"""Where a GetAdAccount's time goes: the bare echo RPC, GetAdAccount with its read answered
from memory, and GetAdAccount, side by side in one run.

    python bench/get_anatomy.py                    # 10 s runs, 3 rounds
    python bench/get_anatomy.py --seconds 5 --rounds 2

It starts a throwaway PostgreSQL (never the shared one), migrates it and seeds 1,000 rows, then
three servers of this checkout, one worker each, with bench/run.py's settings (LOG_LEVEL=WARNING):
bench/echo_server.py; bench/serve_reads_from_memory.py, which is `adaccounts serve` with every
read after the first answered from memory; and `adaccounts serve`. h2load drives each with the
same GetAdAccount request (64 in flight over 16 connections), the servers taking turns run by
run. Each run measures, over its window, the CPU per call of the server's event-loop thread
(where a worker's Python runs; the other threads are gRPC's own), of the whole server process,
and of PostgreSQL.

"from memory ÷ echo" is what is left of bench/run.py's ratio 2 (Get ÷ echo) when the
database costs nothing: gRPC, the guard, the service and the row to its message.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from h2load import H2load
from h2load import installed as h2load_installed
from harness import bench_workdir, exit_with, seed_accounts, server_env
from prepared_reads import process_tree_cpu_s
from replicas import WindowCpu, cluster_cpu_s, median, serving
from revision import working_tree
from run import Server

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # tests/ is not a package; tests/helpers is
from helpers.pg_instance import ThrowawayPostgres  # noqa: E402
from helpers.ports import free_port  # noqa: E402

IN_FLIGHT = 64
CONNECTIONS = 16


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def loop_thread_cpu_s(pid: int) -> float:
    """CPU seconds of a process's main thread, where its event loop runs."""
    import psutil

    try:
        thread = next(t for t in psutil.Process(pid).threads() if t.id == pid)
    except (psutil.Error, StopIteration):
        return float("nan")
    return thread.user_time + thread.system_time


@dataclass
class Side:
    name: str
    case: str  # h2load's: "echo" or "get"
    port: int
    server: Server
    ops: list[float] = field(default_factory=list)
    us: dict[str, list[float]] = field(default_factory=dict)  # CPU per call by reader, each run


def run(args: argparse.Namespace, workdir: Path, cleanup: contextlib.ExitStack) -> list[Side]:
    log("starting a throwaway PostgreSQL and seeding 1,000 rows")
    pg = ThrowawayPostgres("adaccounts_bench_anatomy")
    cleanup.callback(pg.cleanup)
    pg.start()
    tree = working_tree(ROOT)
    env = server_env(f"postgresql://postgres@127.0.0.1:{pg.port}/{pg.database}")
    subprocess.run(tree.cli("migrate"), env=env, cwd=workdir, check=True, capture_output=True)
    account_id = seed_accounts(pg.dsn, 1000)[0]

    python = sys.executable
    serve_options = ["--host", "127.0.0.1", "--workers", "1"]
    sides: list[Side] = []
    for name, case, command in (
        ("echo", "echo", [python, str(ROOT / "bench" / "echo_server.py")]),
        ("Get, read from memory", "get", [python, str(ROOT / "bench" / "serve_reads_from_memory.py"), *serve_options]),
        ("Get", "get", tree.cli("serve", *serve_options)),
    ):
        port = free_port()
        log(f"starting {name} on port {port}")
        server = Server(name, [*command, "--port", str(port)], env, workdir)
        cleanup.callback(server.stop)
        ready = (lambda: True) if case == "echo" else (lambda port=port: serving(f"127.0.0.1:{port}"))
        server.wait_ready(ready, port, 1)
        sides.append(Side(name, case, port, server))

    profile = SimpleNamespace(warmup_s=args.warmup, duration_s=args.seconds)
    h2load = H2load(workdir, profile, account_id, IN_FLIGHT, CONNECTIONS)
    postmaster = pg._postmaster_pid()
    for round_ in range(args.rounds):
        for side in sides if round_ % 2 == 0 else sides[::-1]:
            pid = side.server.process.pid
            readers = {
                "loop": functools.partial(loop_thread_cpu_s, pid),
                "server": functools.partial(process_tree_cpu_s, pid),
                "postgres": functools.partial(cluster_cpu_s, postmaster),
            }
            measured_from = time.time() + args.warmup
            cpu = WindowCpu(readers, measured_from, measured_from + args.seconds)
            outcome = h2load.measure(side.case, side.port)
            spent = cpu.result()
            calls = max(1, outcome.calls)
            side.ops.append(outcome.calls / args.seconds)
            for reader in readers:
                side.us.setdefault(reader, []).append(1e6 * spent.get(reader, float("nan")) / calls)
            log(
                f"round {round_ + 1}, {side.name}: {side.ops[-1]:,.0f} calls/s; CPU per call: event loop"
                f" {side.us['loop'][-1]:.0f} µs, server {side.us['server'][-1]:.0f} µs,"
                f" PostgreSQL {side.us['postgres'][-1]:.0f} µs"
                + (f"; {outcome.errors} errors ({outcome.first_error})" if outcome.errors else "")
            )
    return sides


def render(sides: list[Side], args: argparse.Namespace, took_s: float) -> str:
    echo, memory, get = (median(side.ops) for side in sides)
    lines = [
        f"adaccounts Get anatomy: h2load, {IN_FLIGHT} in flight over {CONNECTIONS} connections; {args.seconds:g} s"
        f" per run after {args.warmup:g} s warm-up; {args.rounds} round(s), servers taking turns; one worker"
        f" each; {os.cpu_count()} CPUs shared by everything; took {took_s:.0f} s",
        "",
        "| server | calls/s | event loop µs/call | server µs/call | PostgreSQL µs/call |",
        "|---|---:|---:|---:|---:|",
    ]
    for side, ops in zip(sides, (echo, memory, get), strict=True):
        us = {reader: median(values) for reader, values in side.us.items()}
        lines.append(f"| {side.name} | {ops:,.0f} | {us['loop']:.0f} | {us['server']:.0f} | {us['postgres']:.0f} |")
    lines += [
        "",
        f"Get, read from memory ÷ echo: {memory / echo:.2f}   Get ÷ echo: {get / echo:.2f}"
        f"   Get ÷ Get, read from memory: {get / memory:.2f}   (calls/s, medians of the runs)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds before each run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per server, taking turns")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.rounds < 1:
        parser.error("--seconds must be positive and --rounds at least 1")
    if not h2load_installed():
        parser.error("needs h2load (Debian's nghttp2-client)")
    started = time.monotonic()
    with bench_workdir("adaccounts-bench-anatomy-") as (workdir, cleanup):
        sides = run(args, workdir, cleanup)
    print(render(sides, args, time.monotonic() - started), flush=True)
    return 0


if __name__ == "__main__":
    exit_with(main)
