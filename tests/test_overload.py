"""Overload is shed, not queued: past MAX_CONCURRENT_RPCS calls are refused at once,
probes keep answering, and oversized messages are refused."""

from __future__ import annotations

import time

import grpc
import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from conftest import RunningServer, test_settings
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_crud import create, rpc_error
from test_deadlines import blocked_backends, update_request, wait_until
from test_errors import hold_row_lock

pytestmark = pytest.mark.faults


@pytest.fixture
def small_server(clean_db, database_url):
    running = RunningServer(
        test_settings(database_url, DB_POOL_SIZE=2, MAX_CONCURRENT_RPCS=2, GRPC_MAX_REQUEST_BYTES=64 * 1024)
    )
    with grpc.insecure_channel(running.target) as channel:
        yield running, channel
    running.stop()


def test_calls_past_the_limit_are_refused_at_once_and_probes_still_answer(small_server, database_url):
    running, channel = small_server
    stub = pb_grpc.AdAccountServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    account = create(stub)
    release, holder = hold_row_lock(database_url, account.id)
    try:
        stuck = [stub.UpdateAdAccount.future(update_request(account.id, f"n{i}"), timeout=30) for i in range(2)]
        wait_until(lambda: running.app.service.in_flight == 2)

        started = time.monotonic()
        error = rpc_error(stub.GetAdAccount, pb.GetAdAccountRequest(id=account.id), timeout=10)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - started < 1, "refused at once, not after queueing"
        assert "overloaded" in error.details()

        response = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        release.set()
        holder.join()
    assert all(f.result().name.startswith("n") for f in stuck), "the calls in progress complete"
    assert stub.GetAdAccount(pb.GetAdAccountRequest(id=account.id)).id == account.id
    wait_until(lambda: not blocked_backends(database_url))


def test_message_above_the_size_limit_is_resource_exhausted(small_server):
    _, channel = small_server
    stub = pb_grpc.AdAccountServiceStub(channel)
    error = rpc_error(stub.GetAdAccount, pb.GetAdAccountRequest(id="x" * (65 * 1024)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # just under the limit is an ordinary (invalid) request
    error = rpc_error(stub.GetAdAccount, pb.GetAdAccountRequest(id="x" * (60 * 1024)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
