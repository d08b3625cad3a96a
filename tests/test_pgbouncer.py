"""The service behind PgBouncer in transaction-pooling mode (Debian's pgbouncer, started on a
free port in front of a throwaway PostgreSQL; see tests/helpers/pgbouncer.py).

Here: CRUD, a List walk in every order, deadlines and cancellation reaching PostgreSQL
through PgBouncer, and statement_timeout never leaking to the next client of a server
connection. The restart, terminated-backend, lost-update and half-written-row tests of
tests/test_faults.py run both directly and through PgBouncer (their `route` parameter).

PgBouncer must be installed (.ci/run installs it); without it these tests fail, saying how
to install it, rather than skip.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator

import grpc
import psycopg
import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from google.protobuf import field_mask_pb2
from helpers.databases import Route, stored
from helpers.load import CALL_TIMEOUT_S
from helpers.locks import row_lock
from helpers.pg_instance import ThrowawayPostgres
from helpers.pgbouncer import PgBouncer
from helpers.polling import wait_until
from helpers.rpc import code_of, new_account
from helpers.server import RunningServer
from helpers.settings import server_settings

pytestmark = pytest.mark.faults

# How soon after the caller gave up the backend must have stopped running its statement.
STOPPED_WITHIN_S = 2.0


@pytest.fixture
def via_bouncer(pg: ThrowawayPostgres, pgbouncer: PgBouncer) -> Route:
    route = Route("pgbouncer", pg, pgbouncer)
    route.wait_ready()
    return route


@pytest.fixture
def running(via_bouncer: Route) -> Iterator[RunningServer]:
    # As docs/deploying.md says to run behind PgBouncer before 1.21 (Debian's is 1.18).
    server = RunningServer(server_settings(via_bouncer.url, DB_PREPARED_STATEMENTS=False))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def stub(running: RunningServer) -> Iterator[pb_grpc.AdAccountServiceStub]:
    with grpc.insecure_channel(running.target) as channel:
        yield pb_grpc.AdAccountServiceStub(channel)


def test_pgbouncer_runs_in_transaction_pooling_mode(pgbouncer):
    connection = psycopg.connect(pgbouncer.admin_dsn, autocommit=True)  # the admin console has no transactions
    with connection.cursor() as cursor:
        cursor.execute("SHOW CONFIG")
        config = {row[0]: row[1] for row in cursor.fetchall()}
    connection.close()
    assert config["pool_mode"] == "transaction"


def test_crud_through_pgbouncer(stub):
    owner = str(uuid.uuid4())
    created = stub.CreateAdAccount(
        pb.CreateAdAccountRequest(ad_account=new_account(owner_id=owner), request_id=str(uuid.uuid4())),
        timeout=CALL_TIMEOUT_S,
    )
    assert stub.GetAdAccount(pb.GetAdAccountRequest(id=created.id), timeout=CALL_TIMEOUT_S) == created
    other = stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account(owner_id=owner)), timeout=5)
    batch = stub.BatchGetAdAccounts(pb.BatchGetAdAccountsRequest(ids=[other.id, created.id]), timeout=5)
    assert list(batch.ad_accounts) == [other, created]

    # A retried create with the same request_id returns the first result.
    retry = pb.CreateAdAccountRequest(ad_account=new_account(owner_id=owner), request_id=str(uuid.uuid4()))
    assert stub.CreateAdAccount(retry, timeout=5) == stub.CreateAdAccount(retry, timeout=5)
    taken = pb.CreateAdAccountRequest(ad_account=new_account(external_id=created.external_id))
    assert code_of(stub.CreateAdAccount, taken, timeout=5)[0] == grpc.StatusCode.ALREADY_EXISTS

    renamed = stub.UpdateAdAccount(
        pb.UpdateAdAccountRequest(
            ad_account=pb.AdAccount(id=created.id, name="Renamed", etag=created.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["name"]),
        ),
        timeout=5,
    )
    assert renamed.name == "Renamed"
    assert renamed.etag != created.etag
    stale = pb.UpdateAdAccountRequest(ad_account=pb.AdAccount(id=created.id, name="Stale", etag=created.etag))
    assert code_of(stub.UpdateAdAccount, stale, timeout=5)[0] == grpc.StatusCode.ABORTED
    stale_delete = pb.DeleteAdAccountRequest(id=created.id, etag=created.etag)
    assert code_of(stub.DeleteAdAccount, stale_delete, timeout=5)[0] == grpc.StatusCode.ABORTED

    stub.DeleteAdAccount(pb.DeleteAdAccountRequest(id=created.id, etag=renamed.etag), timeout=5)
    assert code_of(stub.GetAdAccount, pb.GetAdAccountRequest(id=created.id), timeout=5)[0] == grpc.StatusCode.NOT_FOUND
    bad = pb.GetAdAccountRequest(id="not-a-uuid")
    assert code_of(stub.GetAdAccount, bad, timeout=5)[0] == grpc.StatusCode.INVALID_ARGUMENT


def walk(stub, **fields) -> list[pb.AdAccount]:  # type: ignore[no-untyped-def]
    accounts: list[pb.AdAccount] = []
    token = ""
    for page_size in [7, 1, 50, 13] * 1000:  # the page size may change between pages
        page = stub.ListAdAccounts(
            pb.ListAdAccountsRequest(page_token=token, page_size=page_size, **fields), timeout=CALL_TIMEOUT_S
        )
        accounts.extend(page.ad_accounts)
        token = page.next_page_token
        if not token:
            return accounts
    raise AssertionError("pagination never ended")


def test_list_walk_through_pgbouncer(stub, via_bouncer):
    owner = str(uuid.uuid4())
    names = ["alpha", "Beta", "beta", "Ärger", "zeta", "Zulu", "émile", "alpha"]
    # psycopg 3: leaving the block commits, then closes the connection.
    with psycopg.connect(via_bouncer.pg.dsn) as connection, connection.cursor() as cursor:
        for i in range(137):
            cursor.execute(
                "INSERT INTO ad_accounts (id, owner_id, platform, external_id, name, currency_code, time_zone,"
                " status, create_time, update_time, version)"
                " VALUES (%s, %s, 'META', %s, %s, 'EUR', 'UTC', 'ACTIVE',"
                " '2026-01-01'::timestamptz + (%s || ' seconds')::interval,"
                " '2026-02-01'::timestamptz + (%s || ' seconds')::interval, 1)",
                (str(uuid.uuid4()), owner, f"walk_{uuid.uuid4().hex[:12]}", names[i % 8], str(i // 10), str(i % 13)),
            )
    everything = walk(stub, owner_id=owner, order_by="name")
    assert len(everything) == 137

    def by(field: str):  # type: ignore[no-untyped-def]
        """(key, id), the order the server promises; times compared as times, names by code point."""
        if field.endswith("_time"):
            return lambda account: (getattr(account, field).ToDatetime(), account.id)
        return lambda account: (getattr(account, field), account.id)

    expected = {
        "create_time": sorted(everything, key=by("create_time")),
        "create_time desc": sorted(everything, key=by("create_time"), reverse=True),
        "update_time desc": sorted(everything, key=by("update_time"), reverse=True),
        "name": sorted(everything, key=by("name")),
        "name desc": sorted(everything, key=by("name"), reverse=True),
    }
    for order_by, rows in expected.items():
        assert [a.id for a in walk(stub, owner_id=owner, order_by=order_by)] == [a.id for a in rows], order_by


def backend_still_busy(route: Route, holder: int) -> list[tuple]:
    """Backends (other than the lock holder) still running a statement on ad_accounts
    (the health monitor's `SELECT 1` aside)."""
    connection = psycopg.connect(route.pg.dsn, autocommit=True)
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pid, state, wait_event_type, query FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid NOT IN (pg_backend_pid(), %s) AND state = 'active'"
                " AND query ILIKE '%%ad_accounts%%'",
                (holder,),
            )
            return cursor.fetchall()
    finally:
        connection.close()


def blocked_update(stub, account: pb.AdAccount, timeout: float):  # type: ignore[no-untyped-def]
    return stub.UpdateAdAccount.future(
        pb.UpdateAdAccountRequest(
            ad_account=pb.AdAccount(id=account.id, name="never written"),
            update_mask=field_mask_pb2.FieldMask(paths=["name"]),
        ),
        timeout=timeout,
    )


def test_a_deadline_stops_the_statement_through_pgbouncer(stub, running, via_bouncer):
    account = stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account()), timeout=CALL_TIMEOUT_S)
    before = stored(via_bouncer.pg.dsn, "id = %s", account.id)
    with row_lock(via_bouncer.pg.dsn, account.id) as lock:
        code, _ = code_of(blocked_update(stub, account, timeout=0.3).result)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(
            lambda: not backend_still_busy(via_bouncer, lock.pid),
            STOPPED_WITHIN_S,
            message="the backend to stop the statement of a call past its deadline",
        )
        assert lock.waiters() == []
    wait_until(lambda: running.app.database.checked_out() == 0, 5, message="every connection back in the pool")
    assert stored(via_bouncer.pg.dsn, "id = %s", account.id) == before, "the update went through after its deadline"


def test_a_cancelled_call_stops_its_statement_through_pgbouncer(stub, running, via_bouncer):
    account = stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account()), timeout=CALL_TIMEOUT_S)
    before = stored(via_bouncer.pg.dsn, "id = %s", account.id)
    with row_lock(via_bouncer.pg.dsn, account.id) as lock:
        call = blocked_update(stub, account, timeout=CALL_TIMEOUT_S)
        wait_until(lambda: lock.waiters(), 5, message="the update to wait on the lock")
        call.cancel()
        wait_until(
            lambda: not backend_still_busy(via_bouncer, lock.pid),
            STOPPED_WITHIN_S,
            message="the backend to stop the statement of a cancelled call",
        )
    wait_until(lambda: running.app.database.checked_out() == 0, 5, message="every connection back in the pool")
    assert stored(via_bouncer.pg.dsn, "id = %s", account.id) == before, "the cancelled update went through"


def test_statement_timeout_stays_with_its_transaction_behind_pgbouncer(stub, via_bouncer, pgbouncer):
    # Many calls with short deadlines, spread over PgBouncer's server connections...
    account = stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account()), timeout=CALL_TIMEOUT_S)
    futures = [stub.GetAdAccount.future(pb.GetAdAccountRequest(id=account.id), timeout=2) for _ in range(60)]
    assert all(f.result().id == account.id for f in futures)

    # ...leave no statement_timeout behind on any of them: other clients of the same server
    # connections (held at once, so each gets a different one) see the database's default.
    clients = [psycopg.connect(pgbouncer.dsn) for _ in range(12)]
    seen: list[str] = []
    try:
        barrier = threading.Barrier(len(clients))

        def look(connection) -> None:  # type: ignore[no-untyped-def]
            with connection.cursor() as cursor:
                cursor.execute("SHOW statement_timeout")  # opens a transaction: holds its server connection
                seen.append(cursor.fetchone()[0])
                barrier.wait(10)
            connection.rollback()

        threads = [threading.Thread(target=look, args=(c,)) for c in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15)
    finally:
        for connection in clients:
            connection.close()
    assert seen == ["0"] * len(clients)


def test_prepared_statements_left_on_behind_pgbouncer_fail_no_call(via_bouncer, pgbouncer, json_log):
    """DB_PREPARED_STATEMENTS left at its default behind PgBouncer 1.18 in transaction mode: the
    first statement found missing turns them off, with one warning that says what to set, and
    that read is sent again; no call fails."""
    server = RunningServer(server_settings(via_bouncer.url, DB_POOL_SIZE=4))
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.AdAccountServiceStub(channel)
            account = stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account()), timeout=5)
            owner = pb.ListAdAccountsRequest(owner_id=account.owner_id, page_size=10)

            def reads() -> None:  # spread over the pool's connections, and PgBouncer's
                for _ in range(5):
                    get = pb.GetAdAccountRequest(id=account.id)
                    futures = [stub.GetAdAccount.future(get, timeout=5) for _ in range(8)]
                    futures.append(stub.ListAdAccounts.future(owner, timeout=5))
                    results = [future.result() for future in futures]
                    assert results[:-1] == [account] * 8
                    assert list(results[-1].ad_accounts) == [account]

            reads()
            # New server connections behind the same client connections: none holds a statement
            # the server prepared (which server connection a transaction gets is PgBouncer's choice).
            admin = psycopg.connect(pgbouncer.admin_dsn, autocommit=True)
            try:
                admin.execute("RECONNECT")
            finally:
                admin.close()
            reads()
    finally:
        server.stop()
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    warnings = [line for line in lines if "DB_PREPARED_STATEMENTS=false" in line["message"]]
    assert [line["level"] for line in warnings] == ["WARNING"], warnings
