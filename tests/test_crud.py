"""Get, BatchGet, Create, Update and Delete through a real server and real stubs, on
PostgreSQL and on the embedded SQLite default alike (the contract holds on both)."""

from __future__ import annotations

import contextlib
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb
from helpers.backends import BACKENDS
from helpers.rpc import create, field_violations, mask, new_account, rpc_error

pytestmark = pytest.mark.backends(*BACKENDS)


# --- Create and Get ------------------------------------------------------------------------------


def test_create_returns_the_stored_account_with_server_fields(stub):
    owner = str(uuid.uuid4()).upper()
    before = datetime.now(UTC)
    created = create(stub, owner_id=owner, external_id="act_1234", currency_code="eur", name="Acme — Ünïcode ✓")

    assert str(uuid.UUID(created.id)) == created.id  # lowercase canonical
    assert created.owner_id == owner.lower()
    assert created.currency_code == "EUR"
    assert created.status == pb.STATUS_ACTIVE  # the default
    assert created.name == "Acme — Ünïcode ✓"
    assert created.etag
    assert created.create_time == created.update_time
    assert (
        before - timedelta(seconds=5) < created.create_time.ToDatetime(UTC) < datetime.now(UTC) + timedelta(seconds=5)
    )
    assert stub.GetAdAccount(pb.GetAdAccountRequest(id=created.id.upper())) == created


def test_create_ignores_output_only_fields(stub):
    account = new_account(id=str(uuid.uuid4()), etag="forged", status=pb.STATUS_PAUSED)
    account.create_time.FromDatetime(datetime(2000, 1, 1, tzinfo=UTC))
    created = stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=account))
    assert created.id != account.id
    assert created.etag != "forged"
    assert created.create_time.ToDatetime(UTC).year > 2000
    assert created.status == pb.STATUS_PAUSED


def test_create_with_taken_platform_and_external_id_is_already_exists(stub):
    first = create(stub, platform=pb.PLATFORM_GOOGLE, external_id="123-456-7890")
    error = rpc_error(create, stub, platform=pb.PLATFORM_GOOGLE, external_id="123-456-7890")
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "123-456-7890" in error.details()
    assert first.id in error.details()
    # the same external id on another platform is a different account
    assert create(stub, platform=pb.PLATFORM_TIKTOK, external_id="123-456-7890").id != first.id


def test_retried_create_with_request_id_returns_the_first_account(stub):
    request = pb.CreateAdAccountRequest(ad_account=new_account(), request_id=str(uuid.uuid4()))
    first = stub.CreateAdAccount(request)
    assert stub.CreateAdAccount(request) == first
    listed = stub.ListAdAccounts(pb.ListAdAccountsRequest())
    assert [a.id for a in listed.ad_accounts] == [first.id]


def test_concurrent_retries_with_one_request_id_create_one_account(stub):
    request = pb.CreateAdAccountRequest(ad_account=new_account(), request_id=str(uuid.uuid4()))
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: stub.CreateAdAccount(request), range(8)))
    assert len({r.id for r in results}) == 1
    assert len(stub.ListAdAccounts(pb.ListAdAccountsRequest()).ad_accounts) == 1


def test_get_unknown_id_is_not_found(stub):
    missing = str(uuid.uuid4())
    error = rpc_error(stub.GetAdAccount, pb.GetAdAccountRequest(id=missing))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert missing in error.details()


# --- BatchGet ------------------------------------------------------------------------------------


def test_batch_get_returns_accounts_in_request_order(stub):
    ids = [create(stub).id for _ in range(5)]
    wanted = [ids[3], ids[0], ids[4].upper(), ids[3]]
    response = stub.BatchGetAdAccounts(pb.BatchGetAdAccountsRequest(ids=wanted))
    assert [a.id for a in response.ad_accounts] == [i.lower() for i in wanted]


def test_batch_get_with_a_missing_id_is_not_found_naming_it(stub):
    present = create(stub).id
    missing = str(uuid.uuid4())
    error = rpc_error(stub.BatchGetAdAccounts, pb.BatchGetAdAccountsRequest(ids=[present, missing]))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert missing in error.details()
    assert present not in error.details()


def test_batch_get_accepts_1000_ids_and_refuses_1001(stub):
    ids = [create(stub).id] * 1000
    assert len(stub.BatchGetAdAccounts(pb.BatchGetAdAccountsRequest(ids=ids)).ad_accounts) == 1000
    error = rpc_error(stub.BatchGetAdAccounts, pb.BatchGetAdAccountsRequest(ids=[*ids, ids[0]]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ids" in field_violations(error)


def test_batch_get_of_nothing_is_empty(stub):
    assert list(stub.BatchGetAdAccounts(pb.BatchGetAdAccountsRequest()).ad_accounts) == []


# --- Update --------------------------------------------------------------------------------------


def test_update_with_mask_changes_only_the_masked_fields(stub):
    created = create(stub, name="Before", currency_code="EUR")
    changes = pb.AdAccount(id=created.id, name="After", currency_code="USD")
    updated = stub.UpdateAdAccount(pb.UpdateAdAccountRequest(ad_account=changes, update_mask=mask("name")))
    assert updated.name == "After"
    assert updated.currency_code == "EUR"  # not in the mask
    assert updated.etag != created.etag
    assert updated.update_time.ToDatetime() > created.update_time.ToDatetime()
    assert updated.create_time == created.create_time
    assert stub.GetAdAccount(pb.GetAdAccountRequest(id=created.id)) == updated


def test_update_with_empty_mask_changes_every_mutable_field_set(stub):
    created = create(stub)
    changes = pb.AdAccount(id=created.id, time_zone="America/New_York", status=pb.STATUS_PAUSED, currency_code="usd")
    updated = stub.UpdateAdAccount(pb.UpdateAdAccountRequest(ad_account=changes))
    assert (updated.time_zone, updated.status, updated.currency_code) == ("America/New_York", pb.STATUS_PAUSED, "USD")
    assert updated.name == created.name


def test_update_with_star_mask_replaces_every_mutable_field(stub):
    created = create(stub)
    changes = pb.AdAccount(
        id=created.id, name="N", currency_code="JPY", time_zone="Asia/Tokyo", status=pb.STATUS_ARCHIVED
    )
    updated = stub.UpdateAdAccount(pb.UpdateAdAccountRequest(ad_account=changes, update_mask=mask("*")))
    assert (updated.name, updated.currency_code, updated.time_zone, updated.status) == (
        "N",
        "JPY",
        "Asia/Tokyo",
        pb.STATUS_ARCHIVED,
    )
    # "*" is a full replacement: leaving a required field out is an error, not a silent blank
    error = rpc_error(
        stub.UpdateAdAccount,
        pb.UpdateAdAccountRequest(ad_account=pb.AdAccount(id=created.id, name="only"), update_mask=mask("*")),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {"ad_account.currency_code", "ad_account.time_zone", "ad_account.status"} <= field_violations(error).keys()


def test_update_that_changes_nothing_bumps_neither_etag_nor_update_time(stub):
    created = create(stub, name="Same")
    same = stub.UpdateAdAccount(pb.UpdateAdAccountRequest(ad_account=pb.AdAccount(id=created.id, name="Same")))
    assert same == created


def test_update_with_stale_etag_is_aborted_and_changes_nothing(stub):
    created = create(stub, name="v1")
    request = pb.UpdateAdAccountRequest(ad_account=pb.AdAccount(id=created.id, name="v2", etag=created.etag))
    current = stub.UpdateAdAccount(request)
    stale = pb.UpdateAdAccountRequest(ad_account=pb.AdAccount(id=created.id, name="v3", etag=created.etag))
    error = rpc_error(stub.UpdateAdAccount, stale)
    assert error.code() == grpc.StatusCode.ABORTED
    assert stub.GetAdAccount(pb.GetAdAccountRequest(id=created.id)) == current
    # the current etag works, and no etag means "don't check"
    fresh = pb.UpdateAdAccountRequest(ad_account=pb.AdAccount(id=created.id, name="v3", etag=current.etag))
    assert stub.UpdateAdAccount(fresh).name == "v3"
    assert stub.UpdateAdAccount(pb.UpdateAdAccountRequest(ad_account=pb.AdAccount(id=created.id, name="v4"))).name


def test_update_of_unknown_account_is_not_found(stub):
    request = pb.UpdateAdAccountRequest(ad_account=pb.AdAccount(id=str(uuid.uuid4()), name="x"))
    assert rpc_error(stub.UpdateAdAccount, request).code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("paths", "field"),
    [
        (["owner_id"], "update_mask.paths[0]"),
        (["platform"], "update_mask.paths[0]"),
        (["external_id"], "update_mask.paths[0]"),
        (["name", "etag"], "update_mask.paths[1]"),
        (["create_time"], "update_mask.paths[0]"),
        (["nmae"], "update_mask.paths[0]"),
        (["name", "*"], "update_mask.paths"),
    ],
)
def test_update_with_bad_mask_path_is_invalid_argument(stub, paths, field):
    created = create(stub)
    request = pb.UpdateAdAccountRequest(ad_account=pb.AdAccount(id=created.id, name="x"), update_mask=mask(*paths))
    error = rpc_error(stub.UpdateAdAccount, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(error)
    assert stub.GetAdAccount(pb.GetAdAccountRequest(id=created.id)) == created


def test_update_with_nothing_set_is_invalid_argument(stub):
    created = create(stub)
    error = rpc_error(stub.UpdateAdAccount, pb.UpdateAdAccountRequest(ad_account=pb.AdAccount(id=created.id)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "update_mask" in field_violations(error)


# --- Delete --------------------------------------------------------------------------------------


def test_delete_removes_the_account(stub):
    created = create(stub)
    stub.DeleteAdAccount(pb.DeleteAdAccountRequest(id=created.id))
    assert rpc_error(stub.GetAdAccount, pb.GetAdAccountRequest(id=created.id)).code() == grpc.StatusCode.NOT_FOUND
    again = rpc_error(stub.DeleteAdAccount, pb.DeleteAdAccountRequest(id=created.id))
    assert again.code() == grpc.StatusCode.NOT_FOUND


def test_delete_with_stale_etag_is_aborted_and_keeps_the_account(stub):
    created = create(stub)
    stub.UpdateAdAccount(pb.UpdateAdAccountRequest(ad_account=pb.AdAccount(id=created.id, name="changed")))
    error = rpc_error(stub.DeleteAdAccount, pb.DeleteAdAccountRequest(id=created.id, etag=created.etag))
    assert error.code() == grpc.StatusCode.ABORTED
    current = stub.GetAdAccount(pb.GetAdAccountRequest(id=created.id))
    stub.DeleteAdAccount(pb.DeleteAdAccountRequest(id=created.id, etag=current.etag))


def test_platform_and_external_id_are_free_again_after_delete(stub):
    created = create(stub, external_id="act_reuse")
    stub.DeleteAdAccount(pb.DeleteAdAccountRequest(id=created.id))
    assert create(stub, external_id="act_reuse").id != created.id


# --- the connection pool -------------------------------------------------------------------------


def test_no_connection_is_left_checked_out_after_load(backend):
    stub = backend.stub
    ids = [create(stub).id for _ in range(20)]

    def mixed(i: int) -> None:
        stub.GetAdAccount(pb.GetAdAccountRequest(id=ids[i % 20]))
        stub.ListAdAccounts(pb.ListAdAccountsRequest(page_size=5))
        with contextlib.suppress(grpc.RpcError):
            stub.GetAdAccount(pb.GetAdAccountRequest(id=str(uuid.uuid4())))
        with contextlib.suppress(grpc.RpcError):
            create(stub, external_id="act_dup")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(mixed, range(200)))
    assert backend.server.app.database.checked_out() == 0
