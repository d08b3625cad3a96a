"""CreateAdAccount's request_id (AIP-155), through a real server on PostgreSQL and on the
SQLite default: a retry returns the account as it is now, NOT_FOUND once it was deleted (it
is never created again), INVALID_ARGUMENT when the request_id comes with a different
request; request ids are remembered for REQUEST_ID_RETENTION_S, then forgotten (issue 12,
row 9)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import grpc
import pytest
import sqlalchemy as sa
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from helpers.backends import BACKENDS, Backend
from helpers.polling import wait_until
from helpers.rpc import field_violations, new_account, rpc_error
from helpers.server import RunningServer
from helpers.settings import server_settings
from sqlalchemy.engine import URL

REQUESTS = "ad_account_requests"


pytestmark = pytest.mark.backends(*BACKENDS)


def request_rows(backend: Backend, request_id: str) -> list[sa.Row]:
    return backend.execute(
        f"SELECT account_id, request_hash FROM {REQUESTS} WHERE request_id = :request_id",
        request_id=backend.uuid_value(request_id),
    )


def age_request(backend: Backend, request_id: str, by: timedelta) -> None:
    """Make a request look `by` older than it is (as if made that long ago)."""
    table = sa.table(REQUESTS, sa.column("request_id", sa.Uuid), sa.column("create_time", sa.DateTime(True)))
    engine = sa.create_engine(backend.url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as connection:
            updated = connection.execute(
                sa.update(table)
                .where(table.c.request_id == uuid.UUID(request_id))
                .values(create_time=datetime.now(UTC) - by)
            )
            assert updated.rowcount == 1
    finally:
        engine.dispose()


def forget(backend: Backend, older_than: datetime) -> int:
    """The repository's forget_requests, on a database object of the test's own."""
    from adaccounts_server.db import open_database
    from adaccounts_server.repository import AdAccountRepository

    async def run() -> int:
        database = open_database(server_settings(backend.url, DB_POOL_SIZE=1))
        await database.open()
        try:
            return await AdAccountRepository(database).forget_requests(older_than)
        finally:
            await database.close()

    return asyncio.run(run())


def create(stub: pb_grpc.AdAccountServiceStub, request_id: str, account: pb.AdAccount) -> pb.AdAccount:
    return stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=account, request_id=request_id), timeout=10)


def all_accounts(stub: pb_grpc.AdAccountServiceStub) -> list[pb.AdAccount]:
    return list(stub.ListAdAccounts(pb.ListAdAccountsRequest(page_size=1000), timeout=10).ad_accounts)


# --- a different request with the same request_id ------------------------------------------


def test_a_request_id_reused_with_a_different_body_is_invalid_argument_naming_request_id(backend: Backend) -> None:
    request_id = str(uuid.uuid4())
    account = new_account()
    first = create(backend.stub, request_id, account)

    for change in ({"name": "Another name"}, {"external_id": "act_other"}, {"status": pb.STATUS_PAUSED}):
        other = pb.AdAccount()
        other.CopyFrom(account)
        for field, value in change.items():
            setattr(other, field, value)
        error = rpc_error(create, backend.stub, request_id, other)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (change, error.details())
        violations = field_violations(error)
        assert list(violations) == ["request_id"], violations
        assert "different request" in violations["request_id"]

    assert [a.id for a in all_accounts(backend.stub)] == [first.id]


def test_16_concurrent_different_bodies_with_one_request_id_one_succeeds_the_others_are_invalid_argument(
    backend: Backend,
) -> None:
    request_id = str(uuid.uuid4())
    bodies = [new_account(name=f"Body {i}") for i in range(16)]

    def attempt(body: pb.AdAccount) -> pb.AdAccount | grpc.StatusCode:
        try:
            return create(backend.stub, request_id, body)
        except grpc.RpcError as error:
            return error.code()

    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(attempt, bodies))
    created = [o for o in outcomes if isinstance(o, pb.AdAccount)]
    refused = [o for o in outcomes if not isinstance(o, pb.AdAccount)]
    assert len(created) == 1, outcomes
    assert refused == [grpc.StatusCode.INVALID_ARGUMENT] * 15, outcomes
    winner = bodies[outcomes.index(created[0])]
    assert created[0].name == winner.name
    assert created[0].external_id == winner.external_id
    assert [a.id for a in all_accounts(backend.stub)] == [created[0].id]


# --- the same request retried --------------------------------------------------------------


def test_the_same_request_retried_returns_the_same_account_even_written_differently(backend: Backend) -> None:
    request_id = str(uuid.uuid4())
    owner = str(uuid.uuid4())
    first = create(backend.stub, request_id, new_account(owner_id=owner, external_id="act_same", currency_code="EUR"))
    # The same request in another spelling: id in upper case, currency in lower case, the
    # default status spelled out, output-only fields set (ignored).
    again = new_account(
        owner_id=owner.upper(), external_id="act_same", currency_code="eur", status=pb.STATUS_ACTIVE, etag="x"
    )
    assert create(backend.stub, request_id, again) == first
    assert create(backend.stub, request_id, again) == first
    assert [a.id for a in all_accounts(backend.stub)] == [first.id]


def test_a_retry_after_the_account_was_deleted_is_not_found_and_creates_nothing(backend: Backend) -> None:
    request_id = str(uuid.uuid4())
    account = new_account()
    first = create(backend.stub, request_id, account)
    backend.stub.DeleteAdAccount(pb.DeleteAdAccountRequest(id=first.id), timeout=10)

    error = rpc_error(create, backend.stub, request_id, account)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert first.id in error.details()
    assert "deleted" in error.details()
    assert all_accounts(backend.stub) == []
    # A different body is still a different request.
    other = rpc_error(create, backend.stub, request_id, new_account())
    assert other.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert all_accounts(backend.stub) == []


def test_a_retry_after_an_update_returns_the_account_as_it_is_now(backend: Backend) -> None:
    request_id = str(uuid.uuid4())
    account = new_account()
    first = create(backend.stub, request_id, account)
    updated = backend.stub.UpdateAdAccount(
        pb.UpdateAdAccountRequest(ad_account=pb.AdAccount(id=first.id, name="Renamed", etag=first.etag)), timeout=10
    )
    assert updated.etag != first.etag

    retried = create(backend.stub, request_id, account)
    assert retried == updated
    assert retried.name == "Renamed"
    assert retried.id == first.id


def test_the_request_is_recorded_with_its_hash(backend: Backend) -> None:
    request_id = str(uuid.uuid4())
    created = create(backend.stub, request_id, new_account())
    ((account_id, request_hash),) = request_rows(backend, request_id)
    assert str(account_id if isinstance(account_id, uuid.UUID) else uuid.UUID(account_id)) == created.id
    assert isinstance(request_hash, bytes)
    assert len(request_hash) == 32
    # Old pods still look up ad_accounts.request_id during a rolling deploy: it is still written.
    (row,) = backend.execute(
        "SELECT id FROM ad_accounts WHERE request_id = :request_id", request_id=backend.uuid_value(request_id)
    )
    assert str(uuid.UUID(str(row[0]))) == created.id


def test_a_request_an_older_release_recorded_only_in_ad_accounts_is_still_recognised(backend: Backend) -> None:
    # During a rolling deploy an old pod writes ad_accounts.request_id and no request row.
    account = create(backend.stub, "", new_account())
    request_id = str(uuid.uuid4())
    backend.execute(
        "UPDATE ad_accounts SET request_id = :request_id WHERE id = :id",
        request_id=backend.uuid_value(request_id),
        id=backend.uuid_value(account.id),
    )
    # Its body is unknown, so whatever is sent with it gets the account, never a second one.
    assert create(backend.stub, request_id, new_account()).id == account.id
    assert [a.id for a in all_accounts(backend.stub)] == [account.id]


# --- retention -----------------------------------------------------------------------------


def test_request_ids_older_than_the_retention_are_forgotten_and_the_id_then_creates_anew(backend: Backend) -> None:
    retention = timedelta(days=7)
    deleted_id, kept_id, live_id = (str(uuid.uuid4()) for _ in range(3))
    deleted_account = new_account()
    first = create(backend.stub, deleted_id, deleted_account)
    backend.stub.DeleteAdAccount(pb.DeleteAdAccountRequest(id=first.id), timeout=10)
    kept_account = new_account()
    kept = create(backend.stub, kept_id, kept_account)
    live = create(backend.stub, live_id, new_account())
    age_request(backend, deleted_id, retention + timedelta(hours=1))
    age_request(backend, live_id, retention + timedelta(hours=1))
    age_request(backend, kept_id, retention - timedelta(hours=1))
    assert rpc_error(create, backend.stub, deleted_id, deleted_account).code() == grpc.StatusCode.NOT_FOUND

    assert forget(backend, datetime.now(UTC) - retention) >= 2
    assert request_rows(backend, deleted_id) == []
    assert request_rows(backend, live_id) == []
    assert len(request_rows(backend, kept_id)) == 1

    # Forgotten: the same request_id creates a new account, whether or not the first one still exists.
    anew = create(backend.stub, deleted_id, deleted_account)
    assert anew.id != first.id
    other = create(backend.stub, live_id, new_account(name="A new request"))
    assert other.id != live.id
    assert other.name == "A new request"
    # Within the retention: still remembered.
    assert create(backend.stub, kept_id, kept_account) == kept
    assert rpc_error(create, backend.stub, kept_id, new_account()).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {a.id for a in all_accounts(backend.stub)} == {kept.id, live.id, anew.id, other.id}


def test_the_server_forgets_old_request_ids_by_itself(
    database_url: URL, clean_db: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adaccounts_server import app

    monkeypatch.setattr(app, "_FORGET_REQUESTS_INTERVAL_S", 0.1)
    server = RunningServer(server_settings(database_url, REQUEST_ID_RETENTION_S=3600))
    try:
        with grpc.insecure_channel(server.target) as channel:
            backend = Backend("postgresql", database_url, server, channel)
            old_id, recent_id = str(uuid.uuid4()), str(uuid.uuid4())
            old = create(backend.stub, old_id, new_account())
            create(backend.stub, recent_id, new_account())
            age_request(backend, old_id, timedelta(hours=2))
            wait_until(lambda: request_rows(backend, old_id) == [], 5, message="the old request id to be forgotten")
            assert len(request_rows(backend, recent_id)) == 1
            assert create(backend.stub, old_id, new_account()).id != old.id
    finally:
        server.stop()


def test_a_failure_to_forget_is_one_warning_naming_the_error_type_only(
    database_url: URL, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from adaccounts_server import app
    from adaccounts_server.repository import AdAccountRepository

    attempts: list[tuple[AdAccountRepository, datetime]] = []

    async def failing(self: AdAccountRepository, older_than: datetime) -> int:
        attempts.append((self, older_than))
        raise RuntimeError("DELETE FROM ad_account_requests WHERE secret_detail")

    monkeypatch.setattr(app, "_FORGET_REQUESTS_INTERVAL_S", 0.1)
    monkeypatch.setattr(AdAccountRepository, "forget_requests", failing)
    caplog.set_level(logging.INFO, logger="adaccounts_server")
    server = RunningServer(server_settings(database_url))

    def calls() -> list[datetime]:
        """This server's attempts (the session's servers forget too, and may wake meanwhile)."""
        return [older_than for repository, older_than in attempts if repository is server.app.repository]

    try:
        wait_until(lambda: len(calls()) >= 2, 5, message="two attempts to forget")
    finally:
        server.stop()
    after_stop = len(calls())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "request ids" in r.getMessage()]
    assert warnings, [r.getMessage() for r in caplog.records]
    for record in warnings:
        assert "RuntimeError" in record.getMessage()
        assert "secret_detail" not in record.getMessage()
        assert record.exc_info is None
    assert not any("secret_detail" in r.getMessage() for r in caplog.records)
    # Retention is 7 days by default.
    assert datetime.now(UTC) - calls()[0] == pytest.approx(timedelta(days=7), abs=timedelta(minutes=1))
    time.sleep(0.3)  # deliberately: long enough for another attempt, had the task outlived the server
    assert len(calls()) == after_stop, "the task must stop with the server"
