"""Health needs no token, so its requests are bounded against a hostile caller: a flood of Watch
streams with huge service names must not take the server's memory, and probes keep answering
(issue 12, row 1). The server runs as its own process so that its memory can be measured."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.polling import wait_until
from helpers.ports import free_port
from helpers.settings import PAGE_TOKEN_SECRET, without_settings
from sqlalchemy.engine import URL

pytestmark = pytest.mark.faults

HUGE = "x" * (1024 * 1024)  # what a hostile caller sent: 1 MB service names
CONNECTIONS, STREAMS = 4, 100
# What the flood may add to the server's memory while it lasts, and keep once it is over.
GROWTH_BOUND_MB, KEPT_BOUND_MB = 200, 60


class Served:
    def __init__(self, database_url: URL) -> None:
        self.port, self.health_port = free_port(), free_port()
        env = without_settings(dict(os.environ)) | {
            "DATABASE_URL": database_url.render_as_string(hide_password=False),
            "PAGE_TOKEN_SECRET": PAGE_TOKEN_SECRET,
            "GRPC_HOST": "127.0.0.1",
            "GRPC_PORT": str(self.port),
            "GRPC_HEALTH_PORT": str(self.health_port),
            "LOG_LEVEL": "WARNING",
        }
        command = [sys.executable, "-m", "adaccounts_server.cli", "serve"]
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self.status(self.port) == health_pb2.HealthCheckResponse.SERVING, 20, message="SERVING")

    def status(self, port: int) -> int | None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status
            except grpc.RpcError:
                return None

    def rss_mb(self) -> float:
        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def served(database_url: URL) -> Iterator[Served]:
    server = Served(database_url)
    yield server
    server.stop()


def open_watches(port: int, service: str, connections: int, streams: int) -> tuple[list[grpc.Channel], list]:  # type: ignore[type-arg]
    channels = [
        grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(connections)
    ]
    watches = [
        health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service), timeout=60)
        for channel in channels
        for _ in range(streams)
    ]
    return channels, watches


def first_answer(watch) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        next(watch)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_a_flood_of_huge_watch_requests_is_refused_and_probes_keep_answering(served):
    before = served.rss_mb()
    channels, watches = open_watches(served.port, HUGE, CONNECTIONS, STREAMS)
    try:
        codes = Counter(first_answer(watch) for watch in watches)
        peak = served.rss_mb()
        began = time.monotonic()
        assert served.status(served.port) == health_pb2.HealthCheckResponse.SERVING
        assert served.status(served.health_port) == health_pb2.HealthCheckResponse.SERVING
        probe_s = time.monotonic() - began
    finally:
        for watch in watches:
            watch.cancel()
        for channel in channels:
            channel.close()
    time.sleep(1.0)  # deliberately: the server lets go of the closed streams, which shows nowhere but in its memory
    after = served.rss_mb()
    print(f"\n[health flood] RSS {before:.0f} MB -> {peak:.0f} MB during, {after:.0f} MB after; {dict(codes)}")
    # Refused by the request size limit before it is read (RESOURCE_EXHAUSTED), or by the name check.
    assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT}, codes
    assert probe_s < 1.0
    assert peak - before < GROWTH_BOUND_MB
    assert after - before < KEPT_BOUND_MB


def test_watch_streams_are_capped_per_connection(served):
    channels, watches = open_watches(served.port, "no.such.Service", 1, 12)
    try:
        codes = Counter(first_answer(watch) for watch in watches)
        # The open ones still see real statuses; a probe on the same connection still answers.
        probe = health_pb2_grpc.HealthStub(channels[0]).Check(health_pb2.HealthCheckRequest(), timeout=2)
    finally:
        for watch in watches:
            watch.cancel()
        channels[0].close()
    assert codes == {grpc.StatusCode.OK: 8, grpc.StatusCode.RESOURCE_EXHAUSTED: 4}, codes
    assert probe.status == health_pb2.HealthCheckResponse.SERVING
    # Closing them frees their places.
    channels, watches = open_watches(served.port, "", 1, 8)
    try:
        assert Counter(first_answer(watch) for watch in watches) == {grpc.StatusCode.OK: 8}
    finally:
        for watch in watches:
            watch.cancel()
        channels[0].close()


def test_the_health_port_reads_only_small_requests(served):
    with grpc.insecure_channel(f"127.0.0.1:{served.health_port}") as channel, pytest.raises(grpc.RpcError) as refused:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=HUGE), timeout=5)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert served.status(served.health_port) == health_pb2.HealthCheckResponse.SERVING


def test_a_service_name_longer_than_any_real_one_is_invalid(served):
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Check(health_pb2.HealthCheckRequest(service="s" * 1000), timeout=5)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert first_answer(stub.Watch(health_pb2.HealthCheckRequest(service="s" * 1000), timeout=5)) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
