"""ListAdAccounts: keyset pagination, orders, filters and page tokens."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from adaccounts_server import models
from helpers.backends import BACKENDS
from helpers.rpc import create, field_violations, new_account, rpc_error
from helpers.server import RunningServer
from helpers.settings import server_settings

pytestmark = pytest.mark.backends(*BACKENDS)


def walk(stub, **request_fields) -> list[pb.AdAccount]:
    """Every account, following next_page_token to the end."""
    accounts: list[pb.AdAccount] = []
    token = ""
    for _ in range(10_000):
        page = stub.ListAdAccounts(pb.ListAdAccountsRequest(page_token=token, **request_fields))
        accounts.extend(page.ad_accounts)
        token = page.next_page_token
        if not token:
            return accounts
    raise AssertionError("pagination never ended")


@pytest.fixture
def seeded(stub, backend) -> list[pb.AdAccount]:
    """130 accounts with shared and distinct names, two owners, several platforms and statuses,
    many sharing a create_time (ties broken by id), inserted directly."""
    owners = [uuid.uuid4(), uuid.uuid4()]
    platforms = [models.Platform.META, models.Platform.GOOGLE, models.Platform.TIKTOK, models.Platform.X]
    statuses = [models.Status.ACTIVE, models.Status.PAUSED, models.Status.ARCHIVED]
    names = ["alpha", "Beta", "beta", "Ärger", "zeta", "Zulu", "émile", "alpha"]
    created, updated = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC)
    backend.insert(
        {
            "id": uuid.uuid4(),
            "owner_id": owners[i % 2],
            "platform": platforms[i % 4],
            "external_id": f"ext_{i}",
            "name": names[i % len(names)],
            "currency_code": "EUR",
            "time_zone": "UTC",
            "status": statuses[i % 3],
            "create_time": created + timedelta(seconds=i // 10),  # ten rows per create_time
            "update_time": updated + timedelta(seconds=(i * 7) % 13),
            "version": 1,
        }
        for i in range(130)
    )
    return walk(stub, page_size=1000)


def test_default_order_is_create_time_then_id(seeded):
    keys = [(a.create_time.ToDatetime(), a.id) for a in seeded]
    assert keys == sorted(keys)
    assert len(seeded) == 130


@pytest.mark.parametrize("page_size", [1, 7, 50, 129, 130])
@pytest.mark.parametrize("order_by", ["create_time", "create_time desc", "update_time desc", "name", "name desc"])
def test_walking_pages_returns_every_row_once_in_order(stub, seeded, order_by, page_size):
    accounts = walk(stub, page_size=page_size, order_by=order_by)
    assert sorted(a.id for a in accounts) == sorted(a.id for a in seeded)

    def key(a: pb.AdAccount):
        field = order_by.split()[0]
        value = a.name.encode() if field == "name" else getattr(a, field).ToDatetime()
        return (value, a.id)

    assert [key(a) for a in accounts] == sorted(map(key, accounts), reverse=order_by.endswith("desc"))


def test_name_order_is_by_code_point_not_locale(stub, seeded):
    names = list(dict.fromkeys(a.name for a in walk(stub, order_by="name", page_size=1000)))
    assert names == ["Beta", "Zulu", "alpha", "beta", "zeta", "Ärger", "émile"]


def test_order_by_ignores_case_and_surrounding_spaces(stub, seeded):
    assert walk(stub, order_by="  NAME   Desc ") == walk(stub, order_by="name desc")


def test_filters_combine(stub, seeded):
    owner = next(a.owner_id for a in seeded if a.platform == pb.PLATFORM_META)
    accounts = walk(
        stub,
        owner_id=owner.upper(),
        platforms=[pb.PLATFORM_META, pb.PLATFORM_TIKTOK],
        statuses=[pb.STATUS_ACTIVE],
        page_size=3,
    )
    expected = [
        a.id
        for a in seeded
        if a.owner_id == owner and a.platform in (pb.PLATFORM_META, pb.PLATFORM_TIKTOK) and a.status == pb.STATUS_ACTIVE
    ]
    assert [a.id for a in accounts] == expected
    assert expected


def test_page_size_defaults_to_50_and_caps_at_1000(stub, seeded):
    assert len(stub.ListAdAccounts(pb.ListAdAccountsRequest()).ad_accounts) == 50
    assert len(stub.ListAdAccounts(pb.ListAdAccountsRequest(page_size=5000)).ad_accounts) == 130


def test_last_page_has_no_token_and_empty_table_lists_nothing(stub):
    page = stub.ListAdAccounts(pb.ListAdAccountsRequest())
    assert list(page.ad_accounts) == []
    assert page.next_page_token == ""


def test_negative_page_size_is_invalid_argument(stub):
    error = rpc_error(stub.ListAdAccounts, pb.ListAdAccountsRequest(page_size=-1))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_size" in field_violations(error)


@pytest.mark.parametrize("order_by", ["update_time", "id", "name asc", "name; DROP TABLE ad_accounts", "create_time,"])
def test_unsupported_order_by_is_invalid_argument(stub, order_by):
    error = rpc_error(stub.ListAdAccounts, pb.ListAdAccountsRequest(order_by=order_by))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "order_by" in field_violations(error)


def first_token(stub, **fields) -> str:
    token = stub.ListAdAccounts(pb.ListAdAccountsRequest(page_size=10, **fields)).next_page_token
    assert token
    return token


@pytest.mark.parametrize(
    "other",
    [
        {"order_by": "name"},
        {"owner_id": str(uuid.uuid4())},
        {"platforms": [pb.PLATFORM_META]},
        {"statuses": [pb.STATUS_PAUSED]},
    ],
)
def test_page_token_reused_with_other_filters_or_order_is_invalid_argument(stub, seeded, other):
    token = first_token(stub)
    error = rpc_error(stub.ListAdAccounts, pb.ListAdAccountsRequest(page_token=token, **other))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in field_violations(error)


def test_page_token_survives_a_different_page_size(stub, seeded):
    token = first_token(stub)
    assert len(stub.ListAdAccounts(pb.ListAdAccountsRequest(page_token=token, page_size=3)).ad_accounts) == 3


def test_altered_page_token_is_invalid_argument(stub, seeded):
    token = first_token(stub)
    payload, mac = token.split(".")

    def flip(text: str, index: int) -> str:
        # A middle character: the last one of a base64 text may only carry padding bits.
        return text[:index] + ("A" if text[index] != "A" else "B") + text[index + 1 :]

    tampered = [
        f"{payload}.{flip(mac, len(mac) // 2)}",
        f"{flip(payload, len(payload) // 2)}.{mac}",
        payload,
        "not-a-token",
        "é" * 10,
        token + "." + mac,
        "x" * 5000,
    ]
    for bad in tampered:
        error = rpc_error(stub.ListAdAccounts, pb.ListAdAccountsRequest(page_token=bad))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert "page_token" in field_violations(error)


def test_page_token_is_accepted_by_another_server_with_the_same_secret(stub, seeded, backend):
    token = first_token(stub)
    other = RunningServer(server_settings(backend.url))
    try:
        with grpc.insecure_channel(other.target) as channel:
            page = pb_grpc.AdAccountServiceStub(channel).ListAdAccounts(pb.ListAdAccountsRequest(page_token=token))
            assert page.ad_accounts[0].id == seeded[10].id
    finally:
        other.stop()
    rogue = RunningServer(server_settings(backend.url, PAGE_TOKEN_SECRET="another-secret-entirely"))
    try:
        with grpc.insecure_channel(rogue.target) as channel:
            error = rpc_error(
                pb_grpc.AdAccountServiceStub(channel).ListAdAccounts, pb.ListAdAccountsRequest(page_token=token)
            )
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        rogue.stop()


OLD_KEY, NEW_KEY = "page-key-being-retired-0123456789", "page-key-taking-over-0123456789"


def test_rotating_the_page_token_key_keeps_walks_in_progress_going(seeded, backend):
    """docs/deploying.md, "Rotating the page-token key": add the new key second everywhere, then make it
    first, then drop the old one. A page token minted at any step is accepted by every server
    of that step and the next, so no walk breaks while the Secret rolls out."""
    step = {
        name: RunningServer(server_settings(backend.url, PAGE_TOKEN_SECRET=secret))
        for name, secret in {
            "before": OLD_KEY,
            "added": f"{OLD_KEY},{NEW_KEY}",
            "swapped": f"{NEW_KEY},{OLD_KEY}",
            "dropped": NEW_KEY,
            "neither": "a-key-that-signed-neither-0123456789",
        }.items()
    }
    channels = {name: grpc.insecure_channel(running.target) for name, running in step.items()}
    stubs = {name: pb_grpc.AdAccountServiceStub(channel) for name, channel in channels.items()}

    def next_page(server: str, token: str) -> pb.ListAdAccountsResponse:
        return stubs[server].ListAdAccounts(pb.ListAdAccountsRequest(page_token=token, page_size=10), timeout=5)

    try:
        old_token = stubs["before"].ListAdAccounts(pb.ListAdAccountsRequest(page_size=10), timeout=5).next_page_token
        # A token signed with the old key, still signing while the new one is only added, is
        # accepted once the new key signs ("new,old"): the issue's own case.
        for server in ("added", "swapped"):
            assert next_page(server, old_token).ad_accounts[0].id == seeded[10].id, server
        swapped_token = next_page("swapped", old_token).next_page_token
        # Signed with the new key: accepted by a pod not yet swapped, and after the old key is dropped.
        for server in ("added", "swapped", "dropped"):
            assert next_page(server, swapped_token).ad_accounts[0].id == seeded[20].id, server
        # A token signed by neither key, and an old token once its key is dropped, are refused.
        foreign = stubs["neither"].ListAdAccounts(pb.ListAdAccountsRequest(page_size=10), timeout=5).next_page_token
        for server, token in (("swapped", foreign), ("added", foreign), ("dropped", old_token)):
            error = rpc_error(stubs[server].ListAdAccounts, pb.ListAdAccountsRequest(page_token=token, page_size=10))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, server
            assert "page_token" in field_violations(error)
    finally:
        for channel in channels.values():
            channel.close()
        for running in step.values():
            running.stop()


def test_walk_by_create_time_sees_every_existing_row_once_while_rows_are_inserted(stub, seeded):
    stop = threading.Event()
    inserted: list[str] = []

    def insert_concurrently() -> None:
        while not stop.is_set():
            inserted.append(create(stub).id)

    writer = threading.Thread(target=insert_concurrently)
    writer.start()
    try:
        accounts = walk(stub, page_size=7)
    finally:
        stop.set()
        writer.join()
    ids = [a.id for a in accounts]
    assert len(ids) == len(set(ids)), "a row was returned twice"
    assert {a.id for a in seeded} <= set(ids), "a row that existed for the whole walk was missed"
    assert inserted, "the writer never ran"


def test_list_of_created_accounts_uses_created_values(stub):
    created = [stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account(name=f"n{i}"))) for i in range(3)]
    assert walk(stub, page_size=2) == created
