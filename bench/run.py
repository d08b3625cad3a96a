"""The benchmark of issue 6: one table of throughput, latency and ratios against baselines.

    python bench/run.py                   # full: 100,000 rows, 10 s per case after a 2 s warm-up
    python bench/run.py --smoke           # CI: 5,000 rows, 2 s per case, List's last page is page 100
    python bench/run.py --against HEAD~3  # this checkout ÷ another revision, side by side

It seeds a throwaway PostgreSQL (never the shared one), starts `adaccounts serve` as a
subprocess, drives it from separate load processes and prints one table: h2load (when
installed, see h2load.py) for the cases that repeat one request (Get, echo, REST GET),
Python processes (loadgen.py) for those that need a new request each time. Every
ratio compares two figures measured in this same run, because the machine is shared and
noisy: absolute figures from another day say little. The goals are printed next to the
ratios and never asserted: speed goals live here, not in the tests.

With --against REV it compares two servers instead: REV, built in a git worktree with a
venv of its own (revision.py), and this checkout, served by the interpreter that runs this
script. Both run at once, one worker each (--workers), with the same settings, on the same
seeded PostgreSQL, and the load alternates between them case by case (previous, new, new,
previous, ...; --repeats runs each), so that the machine's noise falls on both. It prints
the median of each side's runs and new ÷ previous for Get, BatchGet(100), List(50) and
Create and Update: throughput and p50/p99 latency. Each server gets only the settings its
revision has (GRPC_THREADS, say, reaches only a revision that still has it), and the table's
header names the settings in which the two differ.

Everything it starts (PostgreSQL, servers, load processes, a worktree and its venv) is stopped
and deleted on the way out, whether the run ends, fails, or is interrupted with Ctrl-C or SIGTERM
(a build kept with --cache-build excepted).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import revision
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from h2load import CASES as H2LOAD_CASES
from h2load import H2load
from h2load import installed as h2load_installed
from harness import PAGE_TOKEN_SECRET, bench_workdir, exit_with
from loadgen import ECHO_METHOD, Job, LoadProcesses, Outcome
from revision import Tree, working_tree

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from helpers.pg_instance import ThrowawayPostgres  # noqa: E402  (tests/ is not a package; tests/helpers is)
from helpers.ports import free_port  # noqa: E402

PAGE_SIZE = 50
# The setting that turns the pre-ping protection off, for "pre-ping on ÷ off" (--pre-ping-off).
PRE_PING_OFF = "DB_POOL_PRE_PING=false"
SERVER_START_TIMEOUT_S = 60.0
# The cases of --against, in order: label, load case, whether on List's deep page.
COMPARED_CASES = [
    ("GetAdAccount", "get", False),
    ("BatchGet(100)", "batch_get", False),
    ("List(50) page 1", "list", False),
    ("List(50) deep page", "list", True),
    ("Create", "create", False),
    ("Update", "update", False),
]


@dataclass(frozen=True)
class Profile:
    name: str
    rows: int
    warmup_s: float
    duration_s: float

    @property
    def deep_page(self) -> int:
        """The page List is timed on besides page 1: 2,000, or the last one of a smaller table."""
        return min(2000, self.rows // PAGE_SIZE)


FULL = Profile("full", rows=100_000, warmup_s=2.0, duration_s=10.0)
SMOKE = Profile("smoke", rows=5_000, warmup_s=0.5, duration_s=2.0)


@dataclass
class Figures:
    """One measured case: throughput and latency inside the window."""

    ops: float
    p50_ms: float
    p99_ms: float
    errors: int
    first_error: str

    @classmethod
    def of(cls, outcome: Outcome, duration_s: float) -> Figures:
        latencies = sorted(outcome.latencies)

        def percentile(q: float) -> float:
            if not latencies:
                return float("nan")
            return 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]

        return cls(outcome.calls / duration_s, percentile(0.50), percentile(0.99), outcome.errors, outcome.first_error)


# --- processes we start and must stop --------------------------------------------------------


class Server:
    """A server subprocess in its own process group, so that stopping it stops its workers too."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.log = workdir / (re.sub(r"[^A-Za-z0-9]+", "_", name) + ".log")
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                env=env,
                cwd=workdir,  # no stray .env file is read from the caller's directory
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us only; we stop the server in order
            )

    def wait_ready(self, ready: Callable[[], bool], port: int, processes: int) -> None:
        """Until `ready()` and `processes` processes listen on `port` (so the load reaches all of them)."""
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not (ready() and _listeners(self.process.pid, port) >= processes):
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {SERVER_START_TIMEOUT_S:g} s:\n{self.tail()}")
            time.sleep(0.1)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        """SIGTERM to the server (a supervisor stops its own workers), then SIGKILL to whatever is left."""
        with contextlib.suppress(ProcessLookupError):
            self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(20)
        with contextlib.suppress(ProcessLookupError):  # a worker that outlived its supervisor
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def _listeners(pid: int, port: int) -> int:
    """How many processes of `pid`'s tree listen on `port` (1 when psutil is missing: assume so)."""
    try:
        return len(_workers(pid, port))
    except ImportError:
        return 1


def _tree(pid: int) -> list:  # type: ignore[type-arg]
    """`pid` and all its descendants, as psutil processes (none once it has exited)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _workers(pid: int, port: int) -> set[int]:
    """The processes of `pid`'s tree that listen on `port`: the ones that serve calls.

    Not every child is a worker (a supervisor may keep helpers, such as multiprocessing's
    resource tracker), and the root is one only when it serves by itself.
    """
    import psutil

    serving = set()
    for process in _tree(pid):
        with contextlib.suppress(psutil.Error):
            if any(c.status == "LISTEN" and c.laddr and c.laddr.port == port for c in process.net_connections()):
                serving.add(process.pid)
    return serving


class RssSampler:
    """Peak resident memory of a server's worker processes, and of all its processes together."""

    def __init__(self, pid: int, port: int) -> None:
        self._pid = pid
        self._port = port
        self._stop = threading.Event()
        self.workers: set[int] = set()
        self.peak_by_pid: dict[int, int] = {}
        self.peak_total = 0
        self.available = True
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        try:
            import psutil
        except ImportError:
            self.available = False
            return
        while not self._stop.is_set():
            self.workers |= _workers(self._pid, self._port)  # a restarted worker is a new one
            total = 0
            for process in _tree(self._pid):
                with contextlib.suppress(psutil.Error):
                    rss = process.memory_info().rss
                    total += rss
                    self.peak_by_pid[process.pid] = max(rss, self.peak_by_pid.get(process.pid, 0))
            self.peak_total = max(self.peak_total, total)
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def peak_worker(self) -> str:
        """'103 MiB': the peak of the largest worker, or n/a."""
        peaks = [self.peak_by_pid[pid] for pid in self.workers if pid in self.peak_by_pid]
        return f"{max(peaks) / 2**20:.0f} MiB" if self.available and peaks else "n/a"

    def describe(self) -> str:
        """'103 MiB max of 2 workers; 230 MiB all 4 processes', or n/a and why."""
        if not self.available:
            return "n/a (pip install psutil)"
        peaks = [self.peak_by_pid[pid] for pid in self.workers if pid in self.peak_by_pid]
        if not peaks:
            return "n/a (no process seen listening)"
        return (
            f"{max(peaks) / 2**20:.0f} MiB max of {len(peaks)} worker(s); "
            f"all {len(self.peak_by_pid)} process(es) together {self.peak_total / 2**20:.0f} MiB"
        )


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Side:
    """One server of --against: which tree, where it listens, what it runs with."""

    role: str  # "previous" | "new"
    tree: Tree
    port: int
    settings: dict[str, str | None]
    pool_size: int | None
    rss: RssSampler


class Bench:
    def __init__(self, args: argparse.Namespace, profile: Profile, workdir: Path, cleanup: contextlib.ExitStack):
        self.args = args
        self.profile = profile
        self.workdir = workdir
        self.cleanup = cleanup
        self.tree = working_tree(ROOT)  # the tree under test: this checkout
        self.trees = [self.tree]  # every tree of this run (for which setting names exist at all)
        self.ids: list[str] = []
        # The settings every server gets (each only those its tree has): the database, the
        # secret, --threads and --set.
        self.settings: dict[str, str] = {}
        self.load: LoadProcesses | None = None
        self.h2load: H2load | None = None

    def log(self, message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    # The environment ------------------------------------------------------------------------

    def env_for(self, tree: Tree, overrides: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a process of `tree`: ours, less the settings `tree` does not have.

        A setting only another tree of the run knows (GRPC_THREADS, say) is dropped, from our own
        environment as well as from the bench's settings, so neither side sees the other's.
        """
        everyone = frozenset().union(*(t.fields for t in self.trees))
        env = {k: v for k, v in os.environ.items() if k in tree.fields or k not in everyone}
        if tree.isolated:  # a built revision imports nothing from this checkout
            env.pop("PYTHONPATH", None)
            env.pop("VIRTUAL_ENV", None)
        else:
            env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")])
        env.update({k: v for k, v in {**self.settings, **(overrides or {})}.items() if k in tree.fields})
        return env

    def not_passed(self, tree: Tree) -> list[str]:
        """The bench's settings that `tree` does not have, so it never saw."""
        return sorted(k for k in self.settings if k not in tree.fields)

    # The database ---------------------------------------------------------------------------

    def start_database(self) -> None:
        self.log(f"starting a throwaway PostgreSQL and seeding {self.profile.rows:,} rows")
        pg = ThrowawayPostgres("adaccounts_bench")
        self.cleanup.callback(pg.cleanup)
        pg.start()
        self.settings = {
            # No driver: each tree's settings pick their own (psycopg2 or psycopg 3).
            "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{pg.port}/{pg.database}",
            "PAGE_TOKEN_SECRET": PAGE_TOKEN_SECRET,
            "LOG_LEVEL": "WARNING",
            "GRPC_HOST": "127.0.0.1",
            "SHUTDOWN_GRACE_S": "2",  # stopping between cases need not wait for long
            **({"GRPC_THREADS": str(self.args.threads)} if self.args.threads else {}),
            **dict(setting.split("=", 1) for setting in self.args.set),
        }
        # This checkout's migrations (with --against too: a database ahead of a server's code
        # keeps it SERVING, migrations being expand/contract).
        migrate = subprocess.run(
            self.tree.cli("migrate"),
            env=self.env_for(self.tree),
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        if migrate.returncode != 0:
            raise RuntimeError(f"adaccounts migrate failed ({migrate.returncode}):\n{migrate.stderr[-3000:]}")
        with psycopg.connect(pg.dsn, autocommit=True) as connection:
            # One statement: distinct create_times, so that page N is one definite page.
            connection.execute(
                "INSERT INTO ad_accounts (id, owner_id, platform, external_id, name, currency_code, time_zone,"
                " status, create_time, update_time, version)"
                " SELECT gen_random_uuid(), md5((i %% 1000)::text)::uuid,"
                " (ARRAY['META', 'GOOGLE', 'TIKTOK', 'X'])[1 + i %% 4], 'ext_' || i, 'Account ' || i, 'EUR',"
                " 'Europe/Paris', (ARRAY['ACTIVE', 'PAUSED', 'ARCHIVED'])[1 + i %% 3],"
                " '2026-01-01'::timestamptz + i * interval '1 second',"
                " '2026-01-01'::timestamptz + i * interval '1 second', 1"
                " FROM generate_series(1, %s) AS i",
                (self.profile.rows,),
            )
            connection.execute("VACUUM ANALYZE ad_accounts")
            # Write the seeded pages out now, not as a checkpoint during the first case.
            connection.execute("CHECKPOINT")
            rows = connection.execute("SELECT id::text FROM ad_accounts ORDER BY random() LIMIT 20000").fetchall()
            self.ids = [row[0] for row in rows]

    def start_load(self) -> None:
        self.load = LoadProcesses(self.args.load_processes)
        self.cleanup.callback(self.load.close)
        if self.args.load == "h2load":
            connections = self.args.connections * self.args.load_processes
            self.h2load = H2load(self.workdir, self.profile, self.ids[0], self.args.in_flight, connections)

    # Servers --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def server(
        self,
        name: str,
        command: list[str],
        ready: Callable[[str], bool],
        port: int,
        processes: int,
        env: dict[str, str],
    ) -> Iterator[Server]:
        self.log(f"starting {name}")
        server = Server(name, command, env, self.workdir)
        try:
            target = f"127.0.0.1:{port}"
            server.wait_ready(lambda: ready(target), port, processes)
            yield server
        finally:
            server.stop()

    def adaccounts(self, name: str, port: int, workers: int | None, **settings: str):  # type: ignore[no-untyped-def]
        command = self.tree.cli("serve", "--host", "127.0.0.1", "--port", str(port))
        if workers is not None:
            command += ["--workers", str(workers)]
        return self.server(name, command, _grpc_serving, port, workers or 1, self.env_for(self.tree, settings))

    # Measuring ------------------------------------------------------------------------------

    def measure(self, label: str, case: str, port: int, page_token: str = "") -> Figures:
        if self.h2load is not None and case in H2LOAD_CASES:
            figures = Figures.of(self.h2load.measure(case, port), self.profile.duration_s)
        else:
            figures = self.measure_from_python(case, port, page_token)
        self.log(
            f"{label}: {figures.ops:,.0f} ops/s, p50 {figures.p50_ms:.1f} ms, p99 {figures.p99_ms:.1f} ms"
            + (f", {figures.errors} errors (first: {figures.first_error})" if figures.errors else "")
        )
        return figures

    def measure_from_python(self, case: str, port: int, page_token: str) -> Figures:
        assert self.load is not None
        in_flight = self.args.in_flight // self.load.count
        job = Job(
            case=case,
            target=f"127.0.0.1:{port}",
            in_flight=in_flight,
            connections=self.args.connections,
            start_at=time.time() + 1.0,  # time for every process to connect first
            warmup_s=self.profile.warmup_s,
            duration_s=self.profile.duration_s,
            ids=self.ids,
            page_token=page_token,
        )
        return Figures.of(self.load.run(job), self.profile.duration_s)

    def deep_page_token(self, port: int) -> str:
        """The token of page `deep_page` (of 50), found by walking once before timing.

        The walk asks for up to 1,000 rows a page (page_size may change between pages),
        so reaching row 99,950 takes 100 calls rather than 1,999.
        """
        skip = (self.profile.deep_page - 1) * PAGE_SIZE
        token = ""
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.AdAccountServiceStub(channel)
            while skip:
                page = stub.ListAdAccounts(pb.ListAdAccountsRequest(page_size=min(1000, skip), page_token=token))
                skip -= len(page.ad_accounts)
                token = page.next_page_token
        return token

    # The full run ---------------------------------------------------------------------------

    def run(self) -> list[Row]:
        profile, args = self.profile, self.args
        if args.threads and "GRPC_THREADS" not in self.tree.fields:
            raise SystemExit("run.py: --threads: this server has no GRPC_THREADS setting (--set DB_POOL_SIZE=N?)")
        self.start_database()
        self.start_load()
        supports_workers = "--workers" in self.tree.serve_help(self.workdir)
        pre_ping_setting, _, pre_ping_off = args.pre_ping_off.partition("=")
        workers = (args.workers or 1) if supports_workers else None
        processes = workers or 1
        settings, pool_size = self.tree.settings(self.env_for(self.tree), self.workdir)
        deep = f"List(50) page {profile.deep_page:,}"
        figures: dict[str, Figures] = {}

        port = free_port()
        with self.adaccounts(f"adaccounts serve (workers {workers or 'n/a'})", port, workers) as server:
            rss = RssSampler(server.process.pid, port)
            try:
                figures["GetAdAccount"] = self.measure("GetAdAccount", "get", port)
                figures["BatchGet(100)"] = self.measure("BatchGet(100)", "batch_get", port)
                figures["List(50) page 1"] = self.measure("List(50) page 1", "list", port)
                figures[deep] = self.measure(deep, "list", port, self.deep_page_token(port))
                figures["Create"] = self.measure("Create", "create", port)
                figures["Update"] = self.measure("Update", "update", port)
            finally:
                rss.stop()

        rest = f"baseline: REST GET, FastAPI + SQLModel, uvicorn, {processes} worker(s)"
        if _rest_stack_installed():
            port = free_port()
            command = [sys.executable, "-m", "uvicorn", "rest_baseline:app", "--app-dir", str(ROOT / "bench")]
            command += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(processes)]
            # As FastAPI's docs deploy it (uvicorn[standard]); named, so that a missing one fails.
            command += ["--loop", "uvloop", "--http", "httptools", "--log-level", "warning", "--no-access-log"]
            # The same pool as the gRPC server's: its size and overflow (none when it has no such setting).
            threads = pool_size or int(settings.get("DB_POOL_SIZE") or settings.get("GRPC_THREADS") or 8)
            env = {
                **self.env_for(self.tree),
                "REST_THREADS": str(threads),
                "REST_MAX_OVERFLOW": settings.get("DB_MAX_OVERFLOW") or "0",
            }
            # uvicorn's workers share the supervisor's socket: only one process listens.
            with self.server("REST baseline", command, _http_ok, port, 1, env):
                stack = _rest_stack(f"127.0.0.1:{port}")
                rest = (
                    f"baseline: REST GET, FastAPI + SQLModel (psycopg 3, pool {threads}), uvicorn ({stack}), "
                    f"{processes} worker(s)"
                )
                figures[rest] = self.measure(rest, "rest_get", port)

        echo = "baseline: echo RPC, no database"
        port = free_port()
        command = [sys.executable, str(ROOT / "bench" / "echo_server.py"), "--port", str(port)]
        command += ["--workers", str(processes)]
        with self.server("echo server", command, _echo_answers, port, processes, self.env_for(self.tree)):
            figures[echo] = self.measure(echo, "echo", port)

        # Ratio 3 compares servers started one after another. Drift on this shared machine
        # (other tenants, PostgreSQL's own background work) would favour whichever side
        # happened to run in a quiet moment, so each side runs twice, interleaved, and the
        # better of its two runs counts.
        no_ping = "GetAdAccount, pre-ping off, best of 2"
        pre_ping_on = "GetAdAccount, pre-ping on, best of 2"
        # label -> (--workers, settings) of the server it measures
        sides: dict[str, tuple[int | None, dict[str, str]]] = {pre_ping_on: (workers, {})}
        if pre_ping_setting in self.tree.fields:
            sides[no_ping] = (workers, {pre_ping_setting: pre_ping_off})
        samples: dict[str, list[Figures]] = {label: [] for label in sides}
        for round_ in (1, 2):
            for label, (count, overrides) in sides.items():
                port = free_port()
                with self.adaccounts(f"adaccounts serve ({label}, run {round_})", port, count, **overrides):
                    samples[label].append(self.measure(f"{label}, run {round_}", "get", port))
        for label, runs in samples.items():
            figures[label] = max(runs, key=lambda f: f.ops)

        return table_rows(
            figures,
            deep=deep,
            rest=rest,
            echo=echo,
            no_ping=no_ping,
            pre_ping_on=pre_ping_on,
            in_flight=args.in_flight,
            rss=rss,
            notes={
                "rest": "n/a: pip install -e ./clients -e '.[bench]'",
                "pre_ping": f"n/a: the server has no {pre_ping_setting} setting",
            },
        )

    # --against ------------------------------------------------------------------------------

    def compare(self, previous: Tree) -> tuple[list[ComparedRow], list[Side]]:
        """Both servers up at once; each case measured on each, alternating, --repeats times."""
        args = self.args
        self.trees = [previous, self.tree]
        for tree in self.trees:
            _ = tree.fields  # and that each interpreter imports its own tree's code
        self.start_database()
        self.start_load()
        workers = args.workers or 1
        deep = f"List(50) page {self.profile.deep_page:,}"
        rows: list[ComparedRow] = []
        with contextlib.ExitStack() as servers:
            sides: list[Side] = []
            for role, tree in (("previous", previous), ("new", self.tree)):
                env = self.env_for(tree, {"GRPC_WORKERS": str(workers)})
                settings, pool_size = tree.settings(env, self.workdir)
                port = free_port()
                command = tree.cli("serve", "--host", "127.0.0.1", "--port", str(port))
                if "--workers" in tree.serve_help(self.workdir):
                    command += ["--workers", str(workers)]
                elif workers != 1:
                    raise RuntimeError(f"{tree.label}: adaccounts serve has no --workers")
                name = f"{role}: {tree.label}"
                server = servers.enter_context(self.server(name, command, _grpc_serving, port, workers, env))
                rss = RssSampler(server.process.pid, port)
                servers.callback(rss.stop)
                sides.append(Side(role, tree, port, settings, pool_size, rss))
            tokens = {side.role: self.deep_page_token(side.port) for side in sides}
            for label, case, on_deep_page in COMPARED_CASES:
                label = deep if on_deep_page else label
                runs: dict[str, list[Figures]] = {side.role: [] for side in sides}
                for round_ in range(args.repeats):
                    # previous, new, new, previous, previous, new, ...: a drift in time favours neither.
                    for side in sides if round_ % 2 == 0 else sides[::-1]:
                        token = tokens[side.role] if on_deep_page else ""
                        figures = self.measure(f"{label}, {side.role}, run {round_ + 1}", case, side.port, token)
                        runs[side.role].append(figures)
                rows.append(ComparedRow(label, runs["previous"], runs["new"]))
        return rows, sides


def _rest_stack_installed() -> bool:
    import importlib.util

    return all(
        importlib.util.find_spec(name)
        for name in ("fastapi", "uvicorn", "uvloop", "httptools", "aiohttp", "sqlmodel", "psycopg")
    )


def _rest_stack(target: str) -> str:
    """'uvloop.Loop, httptools': the event loop and HTTP parser the REST baseline says it runs."""
    with urllib.request.urlopen(f"http://{target}/healthz", timeout=5) as response:
        answer = json.load(response)
    return f"{answer.get('loop', '?')}, {answer.get('http', '?')}"


def _grpc_serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        except grpc.RpcError:
            return False
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def _echo_answers(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        echo = channel.unary_unary(
            ECHO_METHOD,
            request_serializer=pb.GetAdAccountRequest.SerializeToString,
            response_deserializer=pb.AdAccount.FromString,
        )
        try:
            echo(pb.GetAdAccountRequest(id="x"), timeout=1)
        except grpc.RpcError:
            return False
    return True


def _http_ok(target: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{target}/healthz", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


# --- the table -------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    figures: Figures | None = None
    value: str = ""
    goal: str = ""
    met: str = ""


def _ratio(name: str, numerator: float | None, denominator: float | None, goal: str, missing: str) -> Row:
    """A ratio row; the goal is '>= x' or '<= x', printed with whether it is met."""
    if numerator is None or denominator is None or not denominator or numerator != numerator:
        return Row(name, value="n/a", goal=goal, met=missing)
    ratio = numerator / denominator
    limit = float(goal.split()[-1])
    met = ratio >= limit if goal.startswith("≥") else ratio <= limit
    return Row(name, value=f"{ratio:.2f}", goal=goal, met="yes" if met else "no")


def table_rows(
    figures: dict[str, Figures],
    *,
    deep: str,
    rest: str,
    echo: str,
    no_ping: str,
    pre_ping_on: str,
    in_flight: int,
    rss: RssSampler,
    notes: dict[str, str],
) -> list[Row]:
    def ops(name: str) -> float | None:
        return figures[name].ops if name in figures else None

    get = figures["GetAdAccount"]
    first_page = figures["List(50) page 1"]
    rows = [Row(name, figures=value) for name, value in figures.items()]
    rows += [
        _ratio("ratio 1: Get ÷ REST GET", get.ops, ops(rest), "≥ 3.0", notes["rest"]),
        _ratio("ratio 2: Get ÷ echo RPC", get.ops, ops(echo), "≥ 0.55", ""),
        _ratio("ratio 3: Get, pre-ping on ÷ off", ops(pre_ping_on), ops(no_ping), "≥ 0.95", notes["pre_ping"]),
        _ratio(f"ratio 4: {deep} p50 ÷ page 1 p50", figures[deep].p50_ms, first_page.p50_ms, "≤ 1.2", ""),
        _ratio(f"ratio 5: Get p99 ÷ p50 at {in_flight} in flight", get.p99_ms, get.p50_ms, "≤ 4", ""),
    ]
    rows.append(Row("peak RSS per server worker", value=rss.describe()))
    return rows


def render(rows: list[Row], header: str) -> str:
    lines = [
        header,
        "",
        "| row | ops/s | p50 ms | p99 ms | errors | ratio | goal | met |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in rows:
        f = row.figures
        numbers = [f"{f.ops:,.0f}", f"{f.p50_ms:.1f}", f"{f.p99_ms:.1f}", str(f.errors)] if f else ["", "", "", ""]
        lines.append("| " + " | ".join([row.name, *numbers, row.value, row.goal, row.met]) + " |")
    errors = [(row.name, row.figures.first_error) for row in rows if row.figures and row.figures.errors]
    lines += [f"first error in {name}: {error}" for name, error in errors]
    return "\n".join(lines)


@dataclass
class ComparedRow:
    """One case of --against: each side's runs, in the order they ran."""

    name: str
    previous: list[Figures]
    new: list[Figures]


def _median(runs: list[Figures], metric: str) -> float:
    values = [value for value in (getattr(f, metric) for f in runs) if value == value]  # nan: no call completed
    return statistics.median(values) if values else float("nan")


def _quotient(new: float, previous: float) -> str:
    if not previous or new != new or previous != previous:
        return "n/a"
    return f"{new / previous:.2f}"


def render_comparison(rows: list[ComparedRow], header: str, footer: list[str]) -> str:
    lines = [
        header,
        "",
        "| case | ops/s previous | ops/s new | ops/s new ÷ previous (lowest..highest round) "
        "| p50 ms previous | p50 ms new | p50 new ÷ previous | p99 ms previous | p99 ms new | p99 new ÷ previous "
        "| errors previous / new |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ops = (_median(row.previous, "ops"), _median(row.new, "ops"))
        p50 = (_median(row.previous, "p50_ms"), _median(row.new, "p50_ms"))
        p99 = (_median(row.previous, "p99_ms"), _median(row.new, "p99_ms"))
        rounds = sorted(n.ops / p.ops for p, n in zip(row.previous, row.new, strict=True) if p.ops)
        spread = f" ({rounds[0]:.2f}..{rounds[-1]:.2f})" if len(rounds) > 1 else ""
        errors = f"{sum(f.errors for f in row.previous)} / {sum(f.errors for f in row.new)}"
        cells = [
            row.name,
            f"{ops[0]:,.0f}",
            f"{ops[1]:,.0f}",
            _quotient(ops[1], ops[0]) + spread,
            f"{p50[0]:.1f}",
            f"{p50[1]:.1f}",
            _quotient(p50[1], p50[0]),
            f"{p99[0]:.1f}",
            f"{p99[1]:.1f}",
            _quotient(p99[1], p99[0]),
            errors,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *footer]
    for row in rows:
        for role, runs in (("previous", row.previous), ("new", row.new)):
            first = next((f.first_error for f in runs if f.errors), "")
            if first:
                lines.append(f"first error in {row.name}, {role}: {first}")
    return "\n".join(lines)


def settings_differences(previous: Side, new: Side) -> str:
    """'GRPC_THREADS 8 / (none); pool size 8 / 10': the settings the two servers do not share."""

    def show(settings: dict[str, str | None], name: str) -> str:
        if name not in settings:
            return "(no such setting)"
        value = settings[name]
        return "unset" if value is None else value

    differences = [
        f"{name} {show(previous.settings, name)} / {show(new.settings, name)}"
        for name in sorted(set(previous.settings) | set(new.settings))
        if previous.settings.get(name, previous) != new.settings.get(name, new)
    ]
    if previous.pool_size != new.pool_size:
        differences.append(f"pool size {previous.pool_size or '?'} / {new.pool_size or '?'}")
    return "; ".join(differences) or "none"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="adaccounts benchmark (issue 6)")
    parser.add_argument("--smoke", action="store_true", help="a few seconds per case, 5,000 rows (CI)")
    parser.add_argument(
        "--workers",
        type=int,
        help="server processes (default 1, as the server's own GRPC_WORKERS)",
    )
    parser.add_argument(
        "--threads", type=int, help="the server's GRPC_THREADS, where it has one (default: its own default)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SETTING=VALUE",
        help="a server setting, for every server that has it (repeatable), e.g. --set DB_POOL_SIZE=8",
    )
    parser.add_argument("--in-flight", type=int, default=64, help="calls in flight, over all load processes")
    parser.add_argument("--load-processes", type=int, default=2, help="separate load-generator processes")
    # Many connections: each stays with the worker that accepted it, chosen by a kernel hash,
    # and with few of them one worker can get most of the load (docs/benchmarks.md).
    parser.add_argument("--connections", type=int, default=16, help="gRPC connections per load process")
    parser.add_argument(
        "--load",
        choices=("h2load", "python"),
        default="h2load" if h2load_installed() else "python",
        help="load generator for Get, echo and REST GET (default: h2load when installed); "
        "the other cases always use the Python load processes",
    )
    parser.add_argument(
        "--pre-ping-off",
        default=PRE_PING_OFF,
        metavar="SETTING=VALUE",
        help=f"the server setting that turns pre-ping off (default: {PRE_PING_OFF})",
    )
    parser.add_argument(
        "--against",
        metavar="REV",
        help="compare this checkout (new) with git revision REV (previous), built in a worktree and venv "
        "of its own: both served at once, the same database and settings, new ÷ previous per case",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="with --against: runs of each case per side, alternating (median)"
    )
    parser.add_argument(
        "--cache-build",
        action="store_true",
        help="with --against: keep REV's worktree and venv in the temporary directory, keyed by its commit, "
        "and reuse them next time",
    )
    args = parser.parse_args(argv)
    if args.in_flight % args.load_processes:
        parser.error("--in-flight must be a multiple of --load-processes")
    if args.load == "h2load" and not h2load_installed():
        parser.error("--load h2load: h2load is not installed (Debian: apt-get install nghttp2-client)")
    if any("=" not in setting for setting in args.set):
        parser.error("--set wants SETTING=VALUE")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.cache_build and not args.against:
        parser.error("--cache-build goes with --against")
    if args.against:
        try:
            revision.resolve(ROOT, args.against)
        except ValueError as error:
            parser.error(str(error))
    profile = SMOKE if args.smoke else FULL

    started = time.monotonic()
    with bench_workdir("adaccounts-bench-") as (workdir, cleanup):
        bench = Bench(args, profile, workdir, cleanup)
        if args.against:
            previous = cleanup.enter_context(
                revision.built_revision(ROOT, args.against, workdir, args.cache_build, bench.log)
            )
            compared, sides = bench.compare(previous)
            not_passed = {side.role: bench.not_passed(side.tree) for side in sides}
        else:
            rows = bench.run()
    drivers = (
        f"h2load ({args.connections * args.load_processes} gRPC connections) for Get, echo and REST GET, "
        f"{args.load_processes} Python load processes for the rest"
        if args.load == "h2load"
        else f"{args.load_processes} Python load processes ({args.connections} gRPC connections each)"
    )
    if args.against:
        drivers = drivers.replace(", echo and REST GET", "")
    load = (
        f"{args.in_flight} calls in flight from {drivers}; "
        f"{profile.duration_s:g} s per case after {profile.warmup_s:g} s warm-up; {os.cpu_count()} CPUs; "
        f"took {time.monotonic() - started:.0f} s"
    )
    deep_page = f"(smoke: List's deep page is page {profile.deep_page:,}, the last one, not 2,000)"
    if not args.against:
        header = f"adaccounts benchmark, {profile.name}: {profile.rows:,} rows; {load}"
        if profile.deep_page != 2000:
            header += f"\n{deep_page}"
        print(render(rows, header), flush=True)
        return 0

    old, new = sides
    workers = args.workers or 1
    order = " ".join(("P N" if r % 2 == 0 else "N P") for r in range(args.repeats))
    header_lines = [
        f"adaccounts benchmark, {profile.name}, new ÷ previous: {profile.rows:,} rows; {load}",
        f"new (N): {new.tree.label}, {new.tree.root}, served by {new.tree.python}",
        f"previous (P): {old.tree.label}, a git worktree and venv of its own",
        f"both served at once, `adaccounts serve --workers {workers}` each, on the same PostgreSQL with the same "
        f"settings; each case run {args.repeats} time(s) per side, alternating ({order}); medians below",
        f"settings that differ (previous / new): {settings_differences(old, new)}",
    ]
    header_lines += [
        f"settings the bench sets that {role} has not, so never saw: {', '.join(names)}"
        for role, names in not_passed.items()
        if names
    ]
    if profile.deep_page != 2000:
        header_lines.append(deep_page)
    footer = [
        "ops/s: new ÷ previous > 1 is new faster; p50/p99: new ÷ previous < 1 is new answering sooner. "
        "In brackets: the lowest and highest ops/s ratio of one round's pair of runs (the noise).",
        f"peak RSS of a server worker: previous {old.rss.peak_worker()}, new {new.rss.peak_worker()}",
    ]
    print(render_comparison(compared, "\n".join(header_lines), footer), flush=True)
    return 0


if __name__ == "__main__":
    exit_with(main)
