"""Reads as prepared statements or as simple queries (DB_PREPARED_STATEMENTS): throughput, and
the CPU PostgreSQL and the server spend per read.

    python bench/prepared_reads.py                  # Get, BatchGet(100), List(50); 10 s runs, 3 rounds
    python bench/prepared_reads.py --seconds 3 --cases get

It starts a throwaway PostgreSQL (never the shared one), migrates and seeds it, and starts two
servers of this checkout at once on it, the same settings but DB_PREPARED_STATEMENTS: "on" and
"off". Each case is driven by the Python load processes of bench/loadgen.py, the two servers
alternating run by run (on, off, off, on, ...) so that the machine's drift falls on both. Each
run measures, over the same window as its calls, the CPU the PostgreSQL cluster spent
(postmaster and children) and the CPU the server spent (its process and workers), per call.

On this 2-core machine the server, PostgreSQL and the load share the cores: the CPU per read is
the figure that carries to a deployment where PostgreSQL has cores of its own.

Everything it starts is stopped and deleted on the way out, also on Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import bench_workdir, exit_with, seed_accounts, server_env
from loadgen import Job, LoadProcesses
from replicas import WindowCpu, cluster_cpu_s, median, serving
from revision import working_tree
from run import Figures, Server

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # tests/ is not a package; tests/helpers is
from helpers.pg_instance import ThrowawayPostgres  # noqa: E402
from helpers.ports import free_port  # noqa: E402

SIDES = ("on", "off")
CASES = ("get", "batch_get", "list")
CASE_NAMES = {"get": "GetAdAccount", "batch_get": "BatchGet(100)", "list": "List(50) page 1"}


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def process_tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and its live children (a server's workers)."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return float("nan")
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


@dataclass
class Side:
    name: str
    port: int
    server: Server
    runs: dict[str, list[Figures]] = field(default_factory=dict)
    postgres_us: dict[str, list[float]] = field(default_factory=dict)  # per call, each run
    server_us: dict[str, list[float]] = field(default_factory=dict)


def run(args: argparse.Namespace, workdir: Path, cleanup: contextlib.ExitStack) -> list[Side]:
    log(f"starting a throwaway PostgreSQL and seeding {args.rows:,} rows")
    pg = ThrowawayPostgres("adaccounts_bench_prepared")
    cleanup.callback(pg.cleanup)
    pg.start()
    tree = working_tree(ROOT)
    env = server_env(f"postgresql://postgres@127.0.0.1:{pg.port}/{pg.database}", DB_POOL_SIZE=str(args.pool_size))
    subprocess.run(tree.cli("migrate"), env=env, cwd=workdir, check=True, capture_output=True)
    seeded = seed_accounts(pg.dsn, args.rows)
    ids = random.sample(seeded, min(20_000, len(seeded)))

    sides: list[Side] = []
    for name in SIDES:
        port = free_port()
        settings = {"DB_PREPARED_STATEMENTS": "true" if name == "on" else "false"}
        command = tree.cli("serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "1")
        log(f"starting the server with prepared statements {name}")
        server = Server(f"adaccounts serve (prepared {name})", command, {**env, **settings}, workdir)
        cleanup.callback(server.stop)
        server.wait_ready(lambda port=port: serving(f"127.0.0.1:{port}"), port, 1)
        sides.append(Side(name, port, server))

    load = LoadProcesses(args.load_processes)
    cleanup.callback(load.close)
    postmaster = pg._postmaster_pid()
    for case in args.cases:
        for round_ in range(args.rounds):
            for side in sides if round_ % 2 == 0 else sides[::-1]:
                job = Job(
                    case=case,
                    target=f"127.0.0.1:{side.port}",
                    in_flight=args.in_flight // args.load_processes,
                    connections=args.connections,
                    start_at=time.time() + 1.0,  # time for every process to connect first
                    warmup_s=args.warmup,
                    duration_s=args.seconds,
                    ids=ids,
                )
                measured_from = job.start_at + job.warmup_s
                readers = {
                    "postgres": functools.partial(cluster_cpu_s, postmaster),
                    "server": functools.partial(process_tree_cpu_s, side.server.process.pid),
                }
                cpu = WindowCpu(readers, measured_from, measured_from + job.duration_s)
                outcome = load.run(job)
                spent = cpu.result()
                figures = Figures.of(outcome, job.duration_s)
                calls = max(1, outcome.calls)
                side.runs.setdefault(case, []).append(figures)
                side.postgres_us.setdefault(case, []).append(1e6 * spent.get("postgres", float("nan")) / calls)
                side.server_us.setdefault(case, []).append(1e6 * spent.get("server", float("nan")) / calls)
                log(
                    f"{CASE_NAMES[case]}, round {round_ + 1}, prepared {side.name}: {figures.ops:,.0f} calls/s;"
                    f" PostgreSQL {side.postgres_us[case][-1]:.0f} µs CPU/call,"
                    f" server {side.server_us[case][-1]:.0f} µs CPU/call"
                    + (f"; {figures.errors} errors (first: {figures.first_error})" if figures.errors else "")
                )
    return sides


def render(sides: list[Side], args: argparse.Namespace, took_s: float) -> str:
    on, off = sides
    lines = [
        f"adaccounts prepared reads: {args.rows:,} rows; {args.in_flight} calls in flight from"
        f" {args.load_processes} Python load processes; {args.seconds:g} s per run after {args.warmup:g} s"
        f" warm-up; {args.rounds} round(s) alternating; one worker each, DB_POOL_SIZE {args.pool_size};"
        f" {os.cpu_count()} CPUs shared by everything; took {took_s:.0f} s",
        "",
        "| case | calls/s off | calls/s on | on ÷ off | PostgreSQL µs/call off | on | on ÷ off"
        " | server µs/call off | on | on ÷ off | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in args.cases:
        ops = [median([f.ops for f in side.runs[case]]) for side in (off, on)]
        pg = [median(side.postgres_us[case]) for side in (off, on)]
        srv = [median(side.server_us[case]) for side in (off, on)]
        errors = sum(f.errors for side in sides for f in side.runs[case])
        lines.append(
            f"| {CASE_NAMES[case]} | {ops[0]:,.0f} | {ops[1]:,.0f} | {ops[1] / ops[0]:.2f}"
            f" | {pg[0]:.1f} | {pg[1]:.1f} | {pg[1] / pg[0]:.2f}"
            f" | {srv[0]:.1f} | {srv[1]:.1f} | {srv[1] / srv[0]:.2f} | {errors} |"
        )
    lines += [
        "",
        "medians of the runs; CPU is user + system over each run's measured window divided by the calls"
        " completed in it: PostgreSQL's processes (postmaster and children), the server's process.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds before each run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per side and case, alternating")
    parser.add_argument("--rows", type=int, default=100_000, help="seeded accounts")
    parser.add_argument("--pool-size", type=int, default=8, help="DB_POOL_SIZE of each server")
    parser.add_argument("--in-flight", type=int, default=64, help="calls in flight, over all load processes")
    parser.add_argument("--load-processes", type=int, default=2)
    parser.add_argument("--connections", type=int, default=16, help="gRPC connections per load process")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    args = parser.parse_args(argv)
    if args.in_flight % args.load_processes:
        parser.error("--in-flight must be a multiple of --load-processes")
    if args.seconds <= 0 or args.rounds < 1:
        parser.error("--seconds must be positive and --rounds at least 1")
    started = time.monotonic()
    with bench_workdir("adaccounts-bench-prepared-") as (workdir, cleanup):
        sides = run(args, workdir, cleanup)
    print(render(sides, args, time.monotonic() - started), flush=True)
    return 0


if __name__ == "__main__":
    exit_with(main)
