"""CreateAdAccount's request_id (AIP-155), through a real server on PostgreSQL and on the
SQLite default: a retry returns the account as it is now, NOT_FOUND once it was deleted (it
is never created again), INVALID_ARGUMENT when the request_id comes with a different
request; request ids are remembered for REQUEST_ID_RETENTION_S, then forgotten (issue 12,
row 9)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import pytest
import sqlalchemy as sa
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from conftest import RunningServer, new_account, test_settings
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from pg_instance import wait_until
from sqlalchemy.engine import URL, make_url

REQUESTS = "ad_account_requests"


@dataclass
class Backend:
    name: str
    stub: pb_grpc.AdAccountServiceStub
    url: URL  # the server's database

    def execute(self, sql: str, **parameters: object) -> list[sa.Row]:
        """One statement on the server's database, committed; its rows."""
        engine = sa.create_engine(self.url, poolclass=sa.pool.NullPool)
        try:
            with engine.begin() as connection:
                result = connection.execute(sa.text(sql), parameters)
                return list(result) if result.returns_rows else []
        finally:
            engine.dispose()

    def request_rows(self, request_id: str) -> list[sa.Row]:
        return self.execute(
            f"SELECT account_id, request_hash FROM {REQUESTS} WHERE request_id = :request_id",
            request_id=self.uuid_value(request_id),
        )

    def uuid_value(self, value: str) -> object:
        # sa.Uuid stores 32 hex digits on SQLite; text() binds what it is given.
        return uuid.UUID(value).hex if self.name == "sqlite" else uuid.UUID(value)

    def age_request(self, request_id: str, by: timedelta) -> None:
        """Make a request look `by` older than it is (as if made that long ago)."""
        table = sa.table(REQUESTS, sa.column("request_id", sa.Uuid), sa.column("create_time", sa.DateTime(True)))
        engine = sa.create_engine(self.url, poolclass=sa.pool.NullPool)
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

    def forget(self, older_than: datetime) -> int:
        """The repository's forget_requests, on a database object of the test's own."""
        from adaccounts_server.db import open_database
        from adaccounts_server.repository import AdAccountRepository

        async def run() -> int:
            database = open_database(test_settings(self.url, DB_POOL_SIZE=1))
            await database.open()
            try:
                return await AdAccountRepository(database).forget_requests(older_than)
            finally:
                await database.close()

        return asyncio.run(run())


@pytest.fixture(scope="module")
def sqlite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[URL, RunningServer]]:
    """A server on the zero-setup backend (a SQLite file it migrates on start)."""
    url = make_url(f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'adaccounts.db'}")
    running = RunningServer(test_settings(url))
    yield url, running
    running.stop()


@pytest.fixture(params=["postgresql", "sqlite"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "postgresql":
        yield Backend("postgresql", request.getfixturevalue("stub"), request.getfixturevalue("database_url"))
        return
    url, running = request.getfixturevalue("sqlite_server")
    with grpc.insecure_channel(running.target) as channel:
        chosen = Backend("sqlite", pb_grpc.AdAccountServiceStub(channel), url)
        chosen.execute("DELETE FROM ad_accounts")
        yield chosen


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value


def field_violations(error: grpc.RpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)
    assert status is not None
    violations: dict[str, str] = {}
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        assert detail.Unpack(bad_request)
        violations.update({v.field: v.description for v in bad_request.field_violations})
    return violations


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
    assert created[0].name == winner.name and created[0].external_id == winner.external_id
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
    assert first.id in error.details() and "deleted" in error.details()
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
    assert retried.name == "Renamed" and retried.id == first.id


def test_the_request_is_recorded_with_its_hash(backend: Backend) -> None:
    request_id = str(uuid.uuid4())
    created = create(backend.stub, request_id, new_account())
    ((account_id, request_hash),) = backend.request_rows(request_id)
    assert str(account_id if isinstance(account_id, uuid.UUID) else uuid.UUID(account_id)) == created.id
    assert isinstance(request_hash, bytes) and len(request_hash) == 32  # SHA-256
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
    backend.age_request(deleted_id, retention + timedelta(hours=1))
    backend.age_request(live_id, retention + timedelta(hours=1))
    backend.age_request(kept_id, retention - timedelta(hours=1))
    assert rpc_error(create, backend.stub, deleted_id, deleted_account).code() == grpc.StatusCode.NOT_FOUND

    assert backend.forget(datetime.now(UTC) - retention) >= 2
    assert backend.request_rows(deleted_id) == [] and backend.request_rows(live_id) == []
    assert len(backend.request_rows(kept_id)) == 1

    # Forgotten: the same request_id creates a new account, whether or not the first one still exists.
    anew = create(backend.stub, deleted_id, deleted_account)
    assert anew.id != first.id
    other = create(backend.stub, live_id, new_account(name="A new request"))
    assert other.id != live.id and other.name == "A new request"
    # Within the retention: still remembered.
    assert create(backend.stub, kept_id, kept_account) == kept
    assert rpc_error(create, backend.stub, kept_id, new_account()).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {a.id for a in all_accounts(backend.stub)} == {kept.id, live.id, anew.id, other.id}


def test_the_server_forgets_old_request_ids_by_itself(
    database_url: URL, clean_db: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adaccounts_server import app

    monkeypatch.setattr(app, "_FORGET_REQUESTS_INTERVAL_S", 0.1)
    server = RunningServer(test_settings(database_url, REQUEST_ID_RETENTION_S=3600))
    try:
        with grpc.insecure_channel(server.target) as channel:
            backend = Backend("postgresql", pb_grpc.AdAccountServiceStub(channel), database_url)
            old_id, recent_id = str(uuid.uuid4()), str(uuid.uuid4())
            old = create(backend.stub, old_id, new_account())
            create(backend.stub, recent_id, new_account())
            backend.age_request(old_id, timedelta(hours=2))
            wait_until(lambda: backend.request_rows(old_id) == [], 5, message="the old request id to be forgotten")
            assert len(backend.request_rows(recent_id)) == 1
            assert create(backend.stub, old_id, new_account()).id != old.id
    finally:
        server.stop()


def test_a_failure_to_forget_is_one_warning_naming_the_error_type_only(
    database_url: URL, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from adaccounts_server import app
    from adaccounts_server.repository import AdAccountRepository

    calls: list[datetime] = []

    async def failing(self: AdAccountRepository, older_than: datetime) -> int:
        calls.append(older_than)
        raise RuntimeError("DELETE FROM ad_account_requests WHERE secret_detail")

    monkeypatch.setattr(app, "_FORGET_REQUESTS_INTERVAL_S", 0.1)
    monkeypatch.setattr(AdAccountRepository, "forget_requests", failing)
    caplog.set_level(logging.INFO, logger="adaccounts_server")
    server = RunningServer(test_settings(database_url))
    try:
        wait_until(lambda: len(calls) >= 2, 5, message="two attempts to forget")
    finally:
        server.stop()
    after_stop = len(calls)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "request ids" in r.getMessage()]
    assert warnings, [r.getMessage() for r in caplog.records]
    for record in warnings:
        assert "RuntimeError" in record.getMessage()
        assert "secret_detail" not in record.getMessage() and record.exc_info is None
    assert not any("secret_detail" in r.getMessage() for r in caplog.records)
    # Retention is 7 days by default.
    assert datetime.now(UTC) - calls[0] == pytest.approx(timedelta(days=7), abs=timedelta(minutes=1))
    asyncio.run(asyncio.sleep(0.3))
    assert len(calls) == after_stop, "the task must stop with the server"
