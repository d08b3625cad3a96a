"""More calls in flight on one connection than its stream limit queue on the client, never
fail (issue 12, row 2): through a raw stub and through the project's client."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import psycopg
import pytest
from adaccounts import AdAccountsClient
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from helpers.rpc import new_account
from helpers.server import RunningServer
from helpers.settings import server_settings
from sqlalchemy.engine import URL

pytestmark = pytest.mark.faults

IN_FLIGHT = (90, 100, 150, 300)  # against GRPC_MAX_CONCURRENT_STREAMS = 100
ROWS = 1000  # List(1000) answers take long enough to keep their streams open


@pytest.fixture(scope="module")
def roomy_server(database_url: URL) -> Iterator[RunningServer]:
    """The stream limit at its default; enough call slots that only the stream limit matters."""
    running = RunningServer(server_settings(database_url, MAX_CONCURRENT_RPCS=1000, DB_POOL_SIZE=8))
    yield running
    running.stop()


@pytest.fixture
def seeded(database_url: URL, clean_db: None) -> None:
    with psycopg.connect(database_url.set(drivername="postgresql").render_as_string(False), autocommit=True) as db:
        db.execute(
            "INSERT INTO ad_accounts (id, owner_id, platform, external_id, name, currency_code, time_zone,"
            " status, create_time, update_time, version)"
            " SELECT gen_random_uuid(), gen_random_uuid(), 'META', 'streams_' || i, 'Account ' || i, 'EUR',"
            " 'Europe/Paris', 'ACTIVE', now(), now(), 1 FROM generate_series(1, %s) AS i",
            [ROWS],
        )


def outcomes(futures: list[grpc.Future]) -> Counter[str]:
    codes: Counter[str] = Counter()
    for future in futures:
        error = future.exception(timeout=60)
        codes[error.code().name if error is not None else "OK"] += 1
    return codes


@pytest.mark.parametrize("in_flight", IN_FLIGHT)
def test_a_raw_stub_on_a_new_connection_never_sees_a_refused_stream(roomy_server, seeded, in_flight):
    # A new connection each time: the burst starts before or as the server's SETTINGS arrive.
    with grpc.insecure_channel(roomy_server.target) as channel:
        stub = pb_grpc.AdAccountServiceStub(channel)
        request = pb.ListAdAccountsRequest(page_size=ROWS)
        codes = outcomes([stub.ListAdAccounts.future(request, timeout=60) for _ in range(in_flight)])
    assert codes == {"OK": in_flight}, codes


@pytest.mark.parametrize("in_flight", IN_FLIGHT)
def test_the_client_on_one_connection_never_sees_a_refused_stream(roomy_server, seeded, in_flight):
    with AdAccountsClient(roomy_server.target) as client:
        accounts = [client.create(new_account(), timeout=10) for _ in range(10)]

        def update(i: int) -> str:
            account = accounts[i % len(accounts)]
            try:
                client.update(pb.AdAccount(id=account.id, name=f"renamed {i}"), timeout=60)
                client.list(page_size=ROWS, timeout=60)
            except grpc.RpcError as error:  # the client's own errors are RpcErrors too
                return error.code().name if callable(getattr(error, "code", None)) else type(error).__name__
            except Exception as error:
                return type(error).__name__
            return "OK"

        call: Callable[[int], str] = update
        with ThreadPoolExecutor(in_flight) as pool:
            codes = Counter(pool.map(call, range(in_flight)))
    assert codes == {"OK": in_flight}, codes
