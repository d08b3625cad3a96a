"""Overload is shed, not queued: past MAX_CONCURRENT_RPCS calls are refused at once,
probes keep answering, and oversized messages are refused."""

from __future__ import annotations

import time

import grpc
import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.locks import lock_waiters, row_lock
from helpers.polling import wait_until
from helpers.rpc import create, rpc_error, update_request
from helpers.server import RunningServer
from helpers.settings import server_settings

pytestmark = pytest.mark.faults


@pytest.fixture
def small_server(clean_db, database_url):
    running = RunningServer(
        server_settings(database_url, DB_POOL_SIZE=2, MAX_CONCURRENT_RPCS=2, GRPC_MAX_REQUEST_BYTES=64 * 1024)
    )
    with grpc.insecure_channel(running.target) as channel:
        yield running, channel
    running.stop()


def test_calls_past_the_limit_are_refused_at_once_and_probes_still_answer(small_server, database_url):
    running, channel = small_server
    stub = pb_grpc.AdAccountServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    account = create(stub)
    with row_lock(database_url, account.id):
        stuck = [stub.UpdateAdAccount.future(update_request(account.id, f"n{i}"), timeout=30) for i in range(2)]
        wait_until(lambda: running.app.guard.in_flight == 2, message="2 calls in progress")

        started = time.monotonic()
        error = rpc_error(stub.GetAdAccount, pb.GetAdAccountRequest(id=account.id), timeout=10)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - started < 1, "refused at once, not after queueing"
        assert "overloaded" in error.details()

        response = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    assert all(f.result().name.startswith("n") for f in stuck), "the calls in progress complete"
    assert stub.GetAdAccount(pb.GetAdAccountRequest(id=account.id)).id == account.id
    wait_until(lambda: not lock_waiters(database_url), message="no statement waiting on a lock")


def test_message_above_the_size_limit_is_resource_exhausted(small_server):
    _, channel = small_server
    stub = pb_grpc.AdAccountServiceStub(channel)
    error = rpc_error(stub.GetAdAccount, pb.GetAdAccountRequest(id="x" * (65 * 1024)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # just under the limit is an ordinary (invalid) request
    error = rpc_error(stub.GetAdAccount, pb.GetAdAccountRequest(id="x" * (60 * 1024)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
