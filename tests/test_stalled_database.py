"""Each kind of call against a stalled (SIGSTOPped) database: the call ends at its deadline,
health answers promptly throughout, and once the database runs again the call's statement
is gone from PostgreSQL and nothing was written (issue 11)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import grpc
import psycopg
import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.pg_instance import ThrowawayPostgres
from helpers.polling import wait_until
from helpers.rpc import new_account
from helpers.server import RunningServer
from helpers.settings import server_settings

pytestmark = pytest.mark.faults

SERVING = health_pb2.HealthCheckResponse.SERVING
DEADLINE_S = 1.0
# A probe answers from memory: it must never wait on the stalled database.
PROBE_WITHIN_S = 1.0


@pytest.fixture
def server(pg: ThrowawayPostgres) -> Iterator[RunningServer]:
    running = RunningServer(server_settings(pg.url, DB_POOL_SIZE=2))
    yield running
    pg.resume()  # a stalled database would hold up the server's drain
    running.stop()


def busy_statements(pg: ThrowawayPostgres) -> list[str]:
    """The service's pooled backends that are not idle (a statement running, or a transaction open)."""
    with psycopg.connect(pg.dsn, autocommit=True) as connection:
        rows = connection.execute(
            "SELECT state || ': ' || query FROM pg_stat_activity"
            " WHERE application_name = 'adaccounts' AND state <> 'idle'"
        ).fetchall()
    return [row[0] for row in rows]


def probe_until(done: threading.Event, health: health_pb2_grpc.HealthStub) -> list[float]:
    """Probe readiness and liveness until `done`; how long each probe took."""
    took = []
    while not done.is_set():
        for service in ("", "liveness"):
            started = time.monotonic()
            health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            took.append(time.monotonic() - started)
        time.sleep(0.05)  # deliberately: a prober's pace, until told to stop
    return took


@pytest.mark.parametrize("kind", ["Get", "List", "Create", "Update"])
def test_a_call_on_a_stalled_database_ends_at_its_deadline_and_leaves_nothing_behind(kind, server, pg):
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.AdAccountServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        wait_until(
            lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING, 10, message="SERVING"
        )
        account = stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account()), timeout=10)
        stub.GetAdAccount(pb.GetAdAccountRequest(id=account.id), timeout=10)  # a warm connection
        new = new_account()
        calls: dict[str, Callable[[], object]] = {
            "Get": lambda: stub.GetAdAccount(pb.GetAdAccountRequest(id=account.id), timeout=DEADLINE_S),
            "List": lambda: stub.ListAdAccounts(pb.ListAdAccountsRequest(page_size=10), timeout=DEADLINE_S),
            "Create": lambda: stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new), timeout=DEADLINE_S),
            "Update": lambda: stub.UpdateAdAccount(
                pb.UpdateAdAccountRequest(
                    ad_account=pb.AdAccount(id=account.id, name="written while stalled"),
                    update_mask=field_mask_pb2.FieldMask(paths=["name"]),
                ),
                timeout=DEADLINE_S,
            ),
        }

        done = threading.Event()
        probes: list[float] = []
        prober = threading.Thread(target=lambda: probes.extend(probe_until(done, health)), daemon=True)
        pg.pause()
        try:
            prober.start()
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as failed:
                calls[kind]()
            took = time.monotonic() - started
            time.sleep(1.0)  # deliberately: keep probing while the call's cleanup waits on the stalled database
        finally:
            done.set()
            prober.join(10)
            pg.resume()

        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert took < DEADLINE_S + 0.5, f"the call took {took:.2f} s"
        assert probes, "no health probe answered while the database was stalled"
        assert max(probes) < PROBE_WITHIN_S, f"slowest probe {max(probes):.2f} s"

        wait_until(lambda: not busy_statements(pg), 15, message="the stalled call's statement to end in PostgreSQL")
        assert stub.GetAdAccount(pb.GetAdAccountRequest(id=account.id), timeout=10) == account, "nothing changed"
        listed = stub.ListAdAccounts(pb.ListAdAccountsRequest(page_size=1000), timeout=10).ad_accounts
        assert new.external_id not in {a.external_id for a in listed}, "the stalled create was not applied"
