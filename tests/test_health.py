"""The health contract, against a throwaway PostgreSQL that the tests stop, stall and restart.

"", "readiness" and "adaccounts.v1.AdAccountService" follow the database;
"liveness" follows the process. Probes never wait on the database.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import grpc
import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers.pg_instance import ThrowawayPostgres
from helpers.polling import wait_until
from helpers.rpc import code_of, new_account
from helpers.server import RunningServer
from helpers.settings import server_settings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE = "adaccounts.v1.AdAccountService"
DATABASE_BACKED = ("", "readiness", SERVICE)

# How long a status change may take to show: the monitor pings every 0.2 s and
# gives a ping 1 s (server_settings); generous on top for a loaded machine.
CHANGE_WITHIN_S = 8.0
# A probe answers from memory; anything near this means it waited on something.
PROMPT_S = 0.5


class Client:
    """A channel to one server, with the stubs a user of it would hold."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        grpc.channel_ready_future(self.channel).result(timeout=10)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.accounts = pb_grpc.AdAccountServiceStub(self.channel)

    def status(self, service: str = "") -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def statuses(self) -> dict[str, int]:
        return {service: self.status(service) for service in (*DATABASE_BACKED, "liveness")}

    def wait_for(self, status: int, timeout: float = CHANGE_WITHIN_S) -> None:
        """Until every database-backed service reports `status`."""
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        wait_until(
            lambda: all(self.status(service) == status for service in DATABASE_BACKED),
            timeout,
            message=f"{DATABASE_BACKED} to be {name}",
        )

    def create(self) -> pb.AdAccount:
        return self.accounts.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account()), timeout=10)

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def start_server(pg: ThrowawayPostgres) -> Iterator[Callable[..., tuple[RunningServer, Client]]]:
    """Start in-process servers on the throwaway database; stopped after the test (database thawed first)."""
    started: list[tuple[RunningServer, Client]] = []

    def start(**overrides: object) -> tuple[RunningServer, Client]:
        server = RunningServer(server_settings(pg.url, **overrides))
        client = Client(server.target)
        started.append((server, client))
        return server, client

    yield start
    pg.resume()  # a stalled database would hold up the server's drain
    for server, client in started:
        client.close()
        server.stop()


def test_database_backed_services_serve_while_the_database_answers(start_server):
    _, client = start_server()
    client.wait_for(SERVING)

    assert client.statuses() == {"": SERVING, "readiness": SERVING, SERVICE: SERVING, "liveness": SERVING}
    with pytest.raises(grpc.RpcError) as unknown:
        client.status("no.such.Service")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    created = client.create()
    assert client.accounts.GetAdAccount(pb.GetAdAccountRequest(id=created.id), timeout=10) == created


def test_database_outage_is_reported_and_recovered_from_without_a_restart(start_server, pg):
    _, client = start_server()
    client.wait_for(SERVING)
    account = client.create()

    pg.stop()
    client.wait_for(NOT_SERVING)
    assert client.status("liveness") == SERVING

    # Every method says "retry later", none says "internal error".
    stub = client.accounts
    random_id = str(uuid.uuid4())
    calls = {
        "GetAdAccount": lambda: stub.GetAdAccount(pb.GetAdAccountRequest(id=random_id), timeout=10),
        "BatchGetAdAccounts": lambda: stub.BatchGetAdAccounts(
            pb.BatchGetAdAccountsRequest(ids=[account.id]), timeout=10
        ),
        "ListAdAccounts": lambda: stub.ListAdAccounts(pb.ListAdAccountsRequest(), timeout=10),
        "CreateAdAccount": lambda: stub.CreateAdAccount(
            pb.CreateAdAccountRequest(ad_account=new_account()), timeout=10
        ),
        "UpdateAdAccount": lambda: stub.UpdateAdAccount(
            pb.UpdateAdAccountRequest(
                ad_account=pb.AdAccount(id=account.id, name="Renamed"),
                update_mask=field_mask_pb2.FieldMask(paths=["name"]),
            ),
            timeout=10,
        ),
        "DeleteAdAccount": lambda: stub.DeleteAdAccount(pb.DeleteAdAccountRequest(id=account.id), timeout=10),
    }
    assert {name: code_of(call)[0] for name, call in calls.items()} == dict.fromkeys(calls, grpc.StatusCode.UNAVAILABLE)
    assert client.status("liveness") == SERVING

    pg.start()
    client.wait_for(SERVING)
    assert client.status("liveness") == SERVING
    assert stub.GetAdAccount(pb.GetAdAccountRequest(id=account.id), timeout=10) == account
    assert code_of(calls["GetAdAccount"])[0] == grpc.StatusCode.NOT_FOUND
    client.create()


def test_probes_stay_prompt_while_calls_are_stuck_on_a_stalled_database(start_server, pg):
    pool_size = 2
    # A connect timeout longer than the test's bounds: only the monitor's own ping
    # timeout can turn the stall into NOT_SERVING in time.
    server, client = start_server(DB_POOL_SIZE=pool_size, DB_POOL_TIMEOUT=0.5, DB_CONNECT_TIMEOUT=30)
    client.wait_for(SERVING)
    account = client.create()

    # Far more Lists and point reads than pooled connections: every one of them is stuck or queued.
    callers, point_reads = 20, 4
    codes: queue.Queue[grpc.StatusCode] = queue.Queue()

    def caller() -> None:
        request = pb.ListAdAccountsRequest(owner_id=str(uuid.uuid4()))
        codes.put(code_of(lambda: client.accounts.ListAdAccounts(request, timeout=6))[0])

    def point_reader() -> None:
        request = pb.GetAdAccountRequest(id=str(uuid.uuid4()))
        codes.put(code_of(lambda: client.accounts.GetAdAccount(request, timeout=6))[0])

    pg.pause()
    stalled_at = time.monotonic()
    workers = [threading.Thread(target=caller, daemon=True) for _ in range(callers)]
    workers += [threading.Thread(target=point_reader, daemon=True) for _ in range(point_reads)]
    for worker in workers:
        worker.start()
    wait_until(lambda: server.app.guard.in_flight >= callers, 5, message=f"{callers} calls in progress")

    # Probe for a while the database is stalled: every answer prompt, NOT_SERVING soon.
    slowest = 0.0
    not_serving_after = None
    in_flight_then = 0
    while time.monotonic() - stalled_at < 4.0 or not_serving_after is None:
        assert time.monotonic() - stalled_at < CHANGE_WITHIN_S, "never reported NOT_SERVING"
        for service in (*DATABASE_BACKED, "liveness"):
            began = time.monotonic()
            status = client.status(service)
            slowest = max(slowest, time.monotonic() - began)
            if service == "liveness":
                assert status == SERVING
            elif status == NOT_SERVING and not_serving_after is None and service == "":
                not_serving_after = time.monotonic() - stalled_at
                in_flight_then = server.app.guard.in_flight
        time.sleep(0.05)  # deliberately probing on for 4 s (not until a condition): every probe must be prompt
    assert slowest < PROMPT_S, f"a probe took {slowest:.3f} s"
    assert not_serving_after is not None
    assert not_serving_after < CHANGE_WITHIN_S
    # The probes were answered while calls held every pooled connection, stuck.
    assert in_flight_then >= pool_size, in_flight_then
    assert client.statuses() == {"": NOT_SERVING, "readiness": NOT_SERVING, SERVICE: NOT_SERVING, "liveness": SERVING}

    pg.resume()
    client.wait_for(SERVING)
    for worker in workers:
        worker.join(15)
    assert not any(worker.is_alive() for worker in workers), "a call never finished"
    outcomes = [codes.get_nowait() for _ in workers]
    # Stuck calls end as "retry later", "too late" or (if the database came back in time) an answer,
    # never as an internal error.
    allowed = {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.OK,
    }
    assert set(outcomes) <= allowed, outcomes
    wait_until(lambda: server.app.guard.in_flight == 0, 10, message="no call in progress")
    assert client.accounts.GetAdAccount(pb.GetAdAccountRequest(id=account.id), timeout=10) == account


def test_a_server_started_while_the_database_is_down_waits_for_it(start_server, pg):
    pg.stop()
    _, client = start_server()

    # Running, alive, not ready: and it stays that way across many pings.
    until = time.monotonic() + 1.5
    while time.monotonic() < until:
        assert client.statuses() == {
            "": NOT_SERVING,
            "readiness": NOT_SERVING,
            SERVICE: NOT_SERVING,
            "liveness": SERVING,
        }
        time.sleep(0.1)  # deliberately: the statuses must hold across many failed pings, not just be reached
    assert (
        code_of(lambda: client.accounts.GetAdAccount(pb.GetAdAccountRequest(id=str(uuid.uuid4())), timeout=10))[0]
        == grpc.StatusCode.UNAVAILABLE
    )

    pg.start()
    client.wait_for(SERVING)
    created = client.create()
    assert client.accounts.GetAdAccount(pb.GetAdAccountRequest(id=created.id), timeout=10) == created


def test_watch_streams_each_change_once(start_server, pg):
    _, client = start_server()
    client.wait_for(SERVING)

    seen: queue.Queue[int] = queue.Queue()
    stream = client.health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)

    def read() -> None:
        try:
            for response in stream:
                seen.put(response.status)
        except grpc.RpcError:
            pass  # cancelled at the end of the test

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert seen.get(timeout=5) == SERVING

        pg.stop()
        assert seen.get(timeout=CHANGE_WITHIN_S) == NOT_SERVING
        # The outage lasts many pings, each of which fails: none is streamed again.
        failed_pings_until = time.monotonic() + 1.5
        while time.monotonic() < failed_pings_until:
            assert client.status() == NOT_SERVING
            time.sleep(0.1)  # deliberately: the outage lasts, and nothing more may be streamed meanwhile

        pg.start()
        assert seen.get(timeout=CHANGE_WITHIN_S) == SERVING
        recovered_pings_until = time.monotonic() + 1.5
        while time.monotonic() < recovered_pings_until:
            assert client.status() == SERVING
            time.sleep(0.1)  # deliberately: good pings go on, and nothing more may be streamed meanwhile
    finally:
        stream.cancel()
        reader.join(5)
    assert seen.empty(), f"duplicate statuses streamed: {list(seen.queue)}"


def test_reflection_lists_the_services(start_server):
    _, client = start_server()
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)

    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = {service.name for response in responses for service in response.list_services_response.service}

    assert {SERVICE, "grpc.health.v1.Health"} <= names
