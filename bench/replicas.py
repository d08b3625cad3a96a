"""Point reads with one read replica and with none (issue 15): throughput, and the primary's CPU per read.

    python bench/replicas.py                 # 10 s per run after a 2 s warm-up, 3 rounds
    python bench/replicas.py --seconds 3     # shorter runs

It makes a throwaway PostgreSQL primary and a streaming replica of it (tests/helpers/
replication.py; never the shared PostgreSQL), seeds the primary, and starts two servers at
once on it: "none" (DATABASE_URL only) and "replica" (DATABASE_REPLICA_URLS too), with the same
settings otherwise. GetAdAccount on random seeded ids is driven by the Python load processes
of bench/loadgen.py (a closed loop, so many calls in flight), the two servers alternating run
by run (none, replica, replica, none, ...) like bench/run.py --against, so that the machine's
drift falls on both. Each run measures, over the same window as its calls, the CPU the
primary's PostgreSQL processes spent (psutil: the postmaster and all its children, user +
system) and the replica's, per read served. The servers' metrics say who served the reads
(adaccounts_db_reads_total by target).

On one machine the replica takes the reads off the primary but not off the CPUs: throughput
gains only where the primary's CPU, not the machine's, is what runs out. The primary's CPU per
read is the figure that carries to a real deployment, where the replica has cores of its own.

Everything it starts is stopped and deleted on the way out, also on Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import random
import statistics
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import bench_workdir, exit_with, seed_accounts, server_env
from loadgen import Job, LoadProcesses
from revision import working_tree
from run import Figures, Server

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # tests/ is not a package; tests/helpers is
from helpers.ports import free_port  # noqa: E402
from helpers.replication import PrimaryAndReplica  # noqa: E402

SIDES = ("none", "replica")


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- CPU of a PostgreSQL cluster ----------------------------------------------------------------


def cluster_cpu_s(postmaster: int | None) -> float:
    """CPU seconds (user + system) of a postmaster and all its children: those alive now, and
    those it has reaped (its children_user/children_system), so a backend that exited still counts."""
    import psutil

    if postmaster is None:
        return float("nan")
    try:
        root = psutil.Process(postmaster)
        times = root.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        children = root.children(recursive=True)
    except psutil.Error:
        return float("nan")
    for child in children:
        with contextlib.suppress(psutil.Error):
            times = child.cpu_times()
            total += times.user + times.system
    return total


class WindowCpu:
    """The CPU seconds each reader counts between two wall-clock instants (a load's measured
    window); a reader is a callable giving a process's (or a cluster's) CPU seconds so far."""

    def __init__(self, readers: dict[str, Callable[[], float]], start_at: float, end_at: float) -> None:
        self.readers = readers
        self.spent: dict[str, float] = {}
        self._thread = threading.Thread(target=self._sample, args=(start_at, end_at), daemon=True)
        self._thread.start()

    def _sample(self, start_at: float, end_at: float) -> None:
        time.sleep(max(0.0, start_at - time.time()))
        start = {name: read() for name, read in self.readers.items()}
        time.sleep(max(0.0, end_at - time.time()))
        self.spent = {name: read() - start[name] for name, read in self.readers.items()}

    def result(self) -> dict[str, float]:
        self._thread.join(30)
        return self.spent


# --- the servers ----------------------------------------------------------------------------------


def serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        except grpc.RpcError:
            return False
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def scrape(ports: list[int]) -> dict[str, float]:
    """The servers' metrics this bench reads, summed over its workers: name{label} -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, float] = {}
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("adaccounts_db_re"):
                    labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                    key = f"{sample.name}{{{labels}}}"
                    found[key] = found.get(key, 0.0) + sample.value
    return found


@dataclass
class Side:
    name: str
    port: int
    metrics_ports: list[int]
    runs: list[Figures] = field(default_factory=list)
    primary_cpu_us: list[float] = field(default_factory=list)  # per read, each run
    replica_cpu_us: list[float] = field(default_factory=list)
    reads_by_target: dict[str, float] = field(default_factory=dict)  # over all runs


def reads_by_target(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    prefix = "adaccounts_db_reads_total{target="
    return {
        key.removeprefix(prefix).rstrip("}"): after[key] - before.get(key, 0.0)
        for key in after
        if key.startswith(prefix) and after[key] - before.get(key, 0.0)
    }


# --- the run ----------------------------------------------------------------------------------------


def seed(pair: PrimaryAndReplica, rows: int) -> list[str]:
    ids = seed_accounts(pair.primary.dsn, rows)
    pair.wait_caught_up(timeout=120)
    random.Random(15).shuffle(ids)
    return ids[:20000]


def run(args: argparse.Namespace, workdir: Path, cleanup: contextlib.ExitStack) -> tuple[list[Side], int]:
    log("starting a throwaway PostgreSQL primary and a streaming replica")
    pair = PrimaryAndReplica("adaccounts_bench_replicas")
    cleanup.callback(pair.cleanup)
    pair.start()
    log(f"seeding {args.rows:,} rows")
    ids = seed(pair, args.rows)

    tree = working_tree(ROOT)
    env = server_env(pair.primary.url.render_as_string(hide_password=False), DB_POOL_SIZE=str(args.pool_size))
    sides: list[Side] = []
    for name in SIDES:
        port, metrics = free_port(), free_port()
        settings = {"METRICS_PORT": str(metrics)}
        if name == "replica":
            settings["DATABASE_REPLICA_URLS"] = pair.replica_urls_setting
        command = tree.cli("serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(args.workers))
        log(f"starting the server with {'one replica' if name == 'replica' else 'no replica'}")
        server = Server(f"adaccounts serve ({name})", command, {**env, **settings}, workdir)
        cleanup.callback(server.stop)
        server.wait_ready(lambda port=port: serving(f"127.0.0.1:{port}"), port, args.workers)
        sides.append(Side(name, port, [metrics + i for i in range(args.workers)]))

    # The replica in rotation before the first run: its server has measured its lag.
    deadline = time.monotonic() + 30
    while not any(v == 1 for k, v in scrape(sides[1].metrics_ports).items() if "in_rotation" in k):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the replica never came into rotation: {scrape(sides[1].metrics_ports)}")
        time.sleep(0.2)

    load = LoadProcesses(args.load_processes)
    cleanup.callback(load.close)
    postmasters = {"primary": pair.postmaster_pid("primary"), "replica": pair.postmaster_pid("replica")}
    for round_ in range(args.rounds):
        for side in sides if round_ % 2 == 0 else sides[::-1]:
            before = scrape(side.metrics_ports)
            job = Job(
                case="get",
                target=f"127.0.0.1:{side.port}",
                in_flight=args.in_flight // args.load_processes,
                connections=args.connections,
                start_at=time.time() + 1.0,  # time for every process to connect first
                warmup_s=args.warmup,
                duration_s=args.seconds,
                ids=ids,
            )
            measured_from = job.start_at + job.warmup_s
            readers = {name: functools.partial(cluster_cpu_s, pid) for name, pid in postmasters.items()}
            cpu = WindowCpu(readers, measured_from, measured_from + job.duration_s)
            outcome = load.run(job)
            spent = cpu.result()
            figures = Figures.of(outcome, job.duration_s)
            reads = max(1, outcome.calls)
            side.runs.append(figures)
            side.primary_cpu_us.append(1e6 * spent.get("primary", float("nan")) / reads)
            side.replica_cpu_us.append(1e6 * spent.get("replica", float("nan")) / reads)
            for target, count in reads_by_target(before, scrape(side.metrics_ports)).items():
                side.reads_by_target[target] = side.reads_by_target.get(target, 0.0) + count
            log(
                f"round {round_ + 1}, {side.name}: {figures.ops:,.0f} reads/s, p50 {figures.p50_ms:.1f} ms,"
                f" p99 {figures.p99_ms:.1f} ms; primary {side.primary_cpu_us[-1]:.0f} µs CPU/read,"
                f" replica {side.replica_cpu_us[-1]:.0f} µs CPU/read"
                + (f"; {figures.errors} errors (first: {figures.first_error})" if figures.errors else "")
            )
    return sides, len(ids)


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def render(sides: list[Side], args: argparse.Namespace, took_s: float) -> str:
    order = " ".join("N R" if r % 2 == 0 else "R N" for r in range(args.rounds))
    lines = [
        f"adaccounts read replicas: GetAdAccount, {args.rows:,} rows; {args.in_flight} calls in flight from "
        f"{args.load_processes} Python load processes ({args.connections} gRPC connections each); "
        f"{args.seconds:g} s per run after {args.warmup:g} s warm-up; {args.rounds} round(s) alternating ({order}); "
        f"`adaccounts serve --workers {args.workers}`, DB_POOL_SIZE {args.pool_size}; "
        f"{os.cpu_count()} CPUs shared by everything; took {took_s:.0f} s",
        "",
        "| servers reads from | reads/s | p50 ms | p99 ms | errors | primary CPU µs/read | replica CPU µs/read "
        "| reads served by |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for side in sides:
        total = sum(side.reads_by_target.values()) or 1
        by = ", ".join(f"{t} {100 * n / total:.0f} %" for t, n in sorted(side.reads_by_target.items()))
        if not by:  # the server counts reads by target only when it has replicas
            by = "primary (no replica configured)" if side.name == "none" else "n/a"
        cells = [
            "primary only (none)" if side.name == "none" else "one replica",
            f"{median([f.ops for f in side.runs]):,.0f}",
            f"{median([f.p50_ms for f in side.runs]):.1f}",
            f"{median([f.p99_ms for f in side.runs]):.1f}",
            str(sum(f.errors for f in side.runs)),
            f"{median(side.primary_cpu_us):.1f}",
            f"{median(side.replica_cpu_us):.1f}",
            by,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    none, replica = sides
    throughput = median([f.ops for f in replica.runs]) / median([f.ops for f in none.runs])
    primary_cpu = median(replica.primary_cpu_us) / median(none.primary_cpu_us)
    lines += [
        "",
        f"reads/s, one replica ÷ none: {throughput:.2f}",
        f"primary's PostgreSQL CPU per read, one replica ÷ none: {primary_cpu:.2f}",
        "medians of the runs; CPU is the PostgreSQL processes' (postmaster and children, user + system) over each"
        " run's measured window, divided by the reads completed in it.",
    ]
    for side in sides:
        first = next((f.first_error for f in side.runs if f.errors), "")
        if first:
            lines.append(f"first error, {side.name}: {first}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds before each run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per side, alternating")
    parser.add_argument("--rows", type=int, default=20_000, help="seeded accounts")
    parser.add_argument("--workers", type=int, default=1, help="server processes per server")
    parser.add_argument("--pool-size", type=int, default=8, help="DB_POOL_SIZE of each server")
    parser.add_argument("--in-flight", type=int, default=32, help="calls in flight, over all load processes")
    parser.add_argument("--load-processes", type=int, default=2)
    parser.add_argument("--connections", type=int, default=4, help="gRPC connections per load process")
    args = parser.parse_args(argv)
    if args.in_flight % args.load_processes:
        parser.error("--in-flight must be a multiple of --load-processes")
    if args.seconds <= 0 or args.rounds < 1:
        parser.error("--seconds must be positive and --rounds at least 1")
    started = time.monotonic()
    with bench_workdir("adaccounts-bench-replicas-") as (workdir, cleanup):
        sides, _ = run(args, workdir, cleanup)
    print(render(sides, args, time.monotonic() - started), flush=True)
    return 0


if __name__ == "__main__":
    exit_with(main)
