"""The load generator: processes apart from the one that starts servers and prints the table.

The load runs in processes of its own so that the client's CPU (Python, protobuf, HTTP
parsing) never shares a GIL with what is measured. Each process keeps a fixed number of
calls in flight (a closed loop: a call starts when the previous one on its slot ends) over
several connections, because one HTTP/2 connection stays pinned to one of several server
processes sharing a port. All the processes of one case start, warm up and measure over
the same wall-clock window, and report only the calls that completed inside it.

The processes are started once (spawn, so that no gRPC state is inherited through fork)
and then run one job after another, which keeps interpreter start-up out of every case.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import random
import signal
import time
import uuid
from dataclasses import dataclass, field

# gRPC method of the bare echo server (echo_server.py): a GetAdAccountRequest in, an AdAccount out.
ECHO_METHOD = "/adaccounts.bench.Echo/Echo"
CALL_TIMEOUT_S = 10.0


@dataclass
class Job:
    """One case, for one load process."""

    case: str  # get, echo, batch_get, list, create, update, rest_get
    target: str  # host:port
    in_flight: int  # calls this process keeps open at once
    connections: int  # gRPC channels (HTTP/2 connections); HTTP opens one per call in flight
    start_at: float  # time.time() at which every process of the case starts its warm-up
    warmup_s: float
    duration_s: float
    ids: list[str] = field(default_factory=list)  # existing account ids to read and update
    page_token: str = ""  # List: the page to ask for again and again


@dataclass
class Outcome:
    """What one load process saw inside the measured window."""

    calls: int = 0
    errors: int = 0
    first_error: str = ""
    latencies: list[float] = field(default_factory=list)  # seconds, of the calls counted


class LoadProcesses:
    """A fixed set of load processes that run the same job together, case after case."""

    def __init__(self, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._results = context.Queue()
        self._inboxes = []
        self._processes = []
        for number in range(count):
            inbox = context.Queue()
            process = context.Process(
                target=_serve_jobs, args=(inbox, self._results), name=f"bench-load-{number}", daemon=True
            )
            process.start()
            self._inboxes.append(inbox)
            self._processes.append(process)

    @property
    def count(self) -> int:
        return len(self._processes)

    def run(self, job: Job) -> Outcome:
        """Run `job` in every process at once; the merged outcome."""
        for inbox in self._inboxes:
            inbox.put(job)
        deadline = job.start_at + job.warmup_s + job.duration_s + 60
        merged = Outcome()
        for _ in self._processes:
            part = self._next_result(deadline)
            merged.calls += part.calls
            merged.errors += part.errors
            merged.first_error = merged.first_error or part.first_error
            merged.latencies.extend(part.latencies)
        return merged

    def _next_result(self, deadline: float) -> Outcome:
        """The next process's outcome; fail at once if one has died rather than wait for it."""
        while True:
            try:
                return self._results.get(timeout=1)
            except queue.Empty:
                dead = [p.name for p in self._processes if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"load process {', '.join(dead)} died") from None
                if time.time() > deadline:
                    raise RuntimeError("load processes gave no result in time") from None

    def close(self) -> None:
        """Stop every process: ask politely, then terminate whatever is still running a job."""
        for inbox in self._inboxes:
            # Never wait at exit to flush a job into the pipe of a process that is gone.
            inbox.cancel_join_thread()
            inbox.put(None)
        for process in self._processes:
            process.join(2)
            if process.is_alive():
                process.terminate()
                process.join(2)
            if process.is_alive():
                process.kill()


def _serve_jobs(inbox, results) -> None:  # type: ignore[no-untyped-def]
    # Ctrl-C reaches the whole process group: the parent decides when load processes stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for job in iter(inbox.get, None):
        try:
            results.put(asyncio.run(_run(job)))
        except Exception as error:  # report, so the parent never waits for a result that won't come
            results.put(Outcome(errors=1, first_error=f"load process failed: {type(error).__name__}: {error}"))


async def _run(job: Job) -> Outcome:
    if job.case == "rest_get":
        return await _run_http(job)
    return await _run_grpc(job)


async def _run_grpc(job: Job) -> Outcome:
    import grpc
    from adaccounts.v1 import ad_accounts_pb2 as pb
    from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
    from google.protobuf import field_mask_pb2

    # A local subchannel pool: otherwise channels to one target share one TCP connection.
    channels = [
        grpc.aio.insecure_channel(job.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(job.connections)
    ]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), 10)
        rng = random.Random()
        calls = []
        for channel in channels:
            stub = pb_grpc.AdAccountServiceStub(channel)
            echo = channel.unary_unary(
                ECHO_METHOD,
                request_serializer=pb.GetAdAccountRequest.SerializeToString,
                response_deserializer=pb.AdAccount.FromString,
            )

            def make_call(stub=stub, echo=echo):  # type: ignore[no-untyped-def]
                if job.case == "get":
                    return stub.GetAdAccount(pb.GetAdAccountRequest(id=rng.choice(job.ids)), timeout=CALL_TIMEOUT_S)
                if job.case == "echo":
                    return echo(pb.GetAdAccountRequest(id=rng.choice(job.ids)), timeout=CALL_TIMEOUT_S)
                if job.case == "batch_get":
                    request = pb.BatchGetAdAccountsRequest(ids=rng.sample(job.ids, 100))
                    return stub.BatchGetAdAccounts(request, timeout=CALL_TIMEOUT_S)
                if job.case == "list":
                    request = pb.ListAdAccountsRequest(page_size=50, page_token=job.page_token)
                    return stub.ListAdAccounts(request, timeout=CALL_TIMEOUT_S)
                if job.case == "create":
                    account = pb.AdAccount(
                        owner_id=str(uuid.uuid4()),
                        platform=pb.PLATFORM_META,
                        external_id=f"bench_{uuid.uuid4().hex}",
                        name="Bench created",
                        currency_code="EUR",
                        time_zone="Europe/Paris",
                    )
                    request = pb.CreateAdAccountRequest(ad_account=account, request_id=str(uuid.uuid4()))
                    return stub.CreateAdAccount(request, timeout=CALL_TIMEOUT_S)
                if job.case == "update":
                    request = pb.UpdateAdAccountRequest(
                        ad_account=pb.AdAccount(id=rng.choice(job.ids), name=f"Bench renamed {rng.random():.6f}"),
                        update_mask=field_mask_pb2.FieldMask(paths=["name"]),
                    )
                    return stub.UpdateAdAccount(request, timeout=CALL_TIMEOUT_S)
                raise ValueError(f"unknown case {job.case!r}")

            calls.append(make_call)
        return await _drive(job, calls)
    finally:
        for channel in channels:
            await channel.close()


async def _run_http(job: Job) -> Outcome:
    import aiohttp

    rng = random.Random()
    # One keep-alive connection per call in flight, like a pooled HTTP/1.1 client.
    connector = aiohttp.TCPConnector(limit=job.in_flight)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
    ) as session:

        async def get() -> None:
            async with session.get(f"http://{job.target}/ad_accounts/{rng.choice(job.ids)}") as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}")

        return await _drive(job, [get])


async def _drive(job: Job, calls: list) -> Outcome:  # type: ignore[type-arg]
    """Keep `job.in_flight` calls open, spread over `calls` (one per connection), through the window."""
    outcome = Outcome()
    measure_from = job.start_at + job.warmup_s
    measure_to = measure_from + job.duration_s

    async def slot(call) -> None:  # type: ignore[no-untyped-def]
        while time.time() < measure_to:
            started = time.perf_counter()
            error = ""
            try:
                await call()
            except Exception as exc:
                error = _describe(exc)
            elapsed = time.perf_counter() - started
            if measure_from <= time.time() <= measure_to:
                outcome.calls += 1
                outcome.latencies.append(elapsed)
                if error:
                    outcome.errors += 1
                    outcome.first_error = outcome.first_error or error

    await asyncio.sleep(max(0.0, job.start_at - time.time()))
    await asyncio.gather(*(slot(calls[i % len(calls)]) for i in range(job.in_flight)))
    return outcome


def _describe(error: Exception) -> str:
    """One line: a gRPC status and its details, else the exception."""
    code = getattr(error, "code", None)
    if callable(code):  # grpc.aio.AioRpcError
        return f"{code().name}: {error.details()}"  # type: ignore[attr-defined]
    return f"{type(error).__name__}: {error}"
