"""The error table: every bad input and failure maps to the documented status,
with field violations for INVALID_ARGUMENT and nothing internal leaking out."""

from __future__ import annotations

import uuid

import grpc
import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from helpers.backends import BACKENDS
from helpers.databases import create_database, drop_database
from helpers.locks import row_lock, table_lock
from helpers.rpc import assert_clean, create, field_violations, new_account, rpc_error
from helpers.server import RunningServer
from helpers.settings import ADMIN_URL, server_settings

pytestmark = pytest.mark.backends(*BACKENDS)


def create_error(stub, **fields) -> grpc.RpcError:
    error = rpc_error(stub.CreateAdAccount, pb.CreateAdAccountRequest(ad_account=new_account(**fields)))
    assert_clean(error)
    return error


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"owner_id": ""}, "ad_account.owner_id"),
        ({"owner_id": "not-a-uuid"}, "ad_account.owner_id"),
        ({"owner_id": "123e4567e89b12d3a456426614174000"}, "ad_account.owner_id"),  # no hyphens
        ({"owner_id": "{123e4567-e89b-12d3-a456-426614174000}"}, "ad_account.owner_id"),
        ({"owner_id": "123e4567-e89b-12d3-a456-42661417400g"}, "ad_account.owner_id"),
        ({"platform": pb.PLATFORM_UNSPECIFIED}, "ad_account.platform"),
        ({"platform": 42}, "ad_account.platform"),
        ({"status": 42}, "ad_account.status"),
        ({"external_id": ""}, "ad_account.external_id"),
        ({"external_id": "act 1234"}, "ad_account.external_id"),
        ({"external_id": "act\t1"}, "ad_account.external_id"),
        ({"external_id": "x" * 65}, "ad_account.external_id"),
        ({"name": ""}, "ad_account.name"),
        ({"name": "x" * 201}, "ad_account.name"),
        ({"name": "nul\x00byte"}, "ad_account.name"),
        ({"name": "bell\x07"}, "ad_account.name"),
        ({"name": "line\nbreak"}, "ad_account.name"),
        ({"currency_code": ""}, "ad_account.currency_code"),
        ({"currency_code": "EURO"}, "ad_account.currency_code"),
        ({"currency_code": "E1R"}, "ad_account.currency_code"),
        ({"currency_code": "ÉUR"}, "ad_account.currency_code"),
        ({"time_zone": ""}, "ad_account.time_zone"),
        ({"time_zone": "Mars/Olympus_Mons"}, "ad_account.time_zone"),
        ({"time_zone": "../../etc/passwd"}, "ad_account.time_zone"),
    ],
)
def test_create_with_invalid_field_is_invalid_argument_naming_it(stub, fields, field):
    error = create_error(stub, **fields)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(error)
    assert list(stub.ListAdAccounts(pb.ListAdAccountsRequest()).ad_accounts) == [], "nothing may be written"


def test_limits_are_inclusive(stub):
    account = create(stub, name="n" * 200, external_id="e" * 64)
    assert (len(account.name), len(account.external_id)) == (200, 64)


def test_every_violation_is_reported_at_once(stub):
    error = rpc_error(stub.CreateAdAccount, pb.CreateAdAccountRequest(ad_account=pb.AdAccount()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(error)) == {
        "ad_account.owner_id",
        "ad_account.platform",
        "ad_account.external_id",
        "ad_account.name",
        "ad_account.currency_code",
        "ad_account.time_zone",
    }


def test_create_without_ad_account_is_invalid_argument(stub):
    error = rpc_error(stub.CreateAdAccount, pb.CreateAdAccountRequest())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ad_account" in field_violations(error)


def test_malformed_request_id_is_invalid_argument(stub):
    request = pb.CreateAdAccountRequest(ad_account=new_account(), request_id="retry-1")
    error = rpc_error(stub.CreateAdAccount, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id" in field_violations(error)


@pytest.mark.parametrize("bad_id", ["", "42", "' OR 1=1 --", "123e4567-e89b-12d3-a456-4266141740001", "\x00" * 36])
def test_malformed_ids_are_invalid_argument_on_every_rpc(stub, bad_id):
    calls = [
        (stub.GetAdAccount, pb.GetAdAccountRequest(id=bad_id), "id"),
        (stub.DeleteAdAccount, pb.DeleteAdAccountRequest(id=bad_id), "id"),
        (stub.BatchGetAdAccounts, pb.BatchGetAdAccountsRequest(ids=[str(uuid.uuid4()), bad_id]), "ids[1]"),
        (
            stub.UpdateAdAccount,
            pb.UpdateAdAccountRequest(ad_account=pb.AdAccount(id=bad_id, name="x")),
            "ad_account.id",
        ),
    ]
    if bad_id:
        calls.append((stub.ListAdAccounts, pb.ListAdAccountsRequest(owner_id=bad_id), "owner_id"))
    for call, request, field in calls:
        error = rpc_error(call, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, call
        assert field in field_violations(error)
        assert_clean(error)


def test_bad_enum_values_in_list_filters_are_invalid_argument(stub):
    error = rpc_error(stub.ListAdAccounts, pb.ListAdAccountsRequest(platforms=[pb.PLATFORM_META, 99], statuses=[0]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {"platforms[1]", "statuses[0]"} <= field_violations(error).keys()


@pytest.mark.parametrize(
    ("method", "payload"),
    [
        ("GetAdAccount", b"\xff\xff\xff\xff"),  # not a protobuf message at all
        ("GetAdAccount", b"\x0a\x02\xff\xfe"),  # id holding invalid UTF-8
        ("DeleteAdAccount", b"\x0a\x80"),  # truncated
        ("ListAdAccounts", b"\x12\x02\xff\xfe"),  # page_token holding invalid UTF-8
        ("CreateAdAccount", b"\x0a\x05\x22\x03\xc3\x28\x41"),  # ad_account.external_id, invalid UTF-8
        ("UpdateAdAccount", b"\x12\x10"),  # update_mask longer than the message
        ("BatchGetAdAccounts", b"\x0a\x01\x80"),  # ids[0] invalid UTF-8
    ],
)
def test_bytes_that_are_not_a_message_are_invalid_argument(backend, method, payload):
    call = backend.channel.unary_unary(f"/adaccounts.v1.AdAccountService/{method}")
    error = rpc_error(call, payload, timeout=5)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "not a valid" in error.details()


def test_oversized_message_is_resource_exhausted(stub):
    error = rpc_error(stub.GetAdAccount, pb.GetAdAccountRequest(id="x" * (5 * 1024 * 1024)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_unknown_account_is_not_found_and_taken_pair_already_exists(stub):
    assert rpc_error(stub.GetAdAccount, pb.GetAdAccountRequest(id=str(uuid.uuid4()))).code() == (
        grpc.StatusCode.NOT_FOUND
    )
    create(stub, external_id="dup")
    error = create_error(stub, external_id="dup")
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.postgresql_only("a row lock held by another client makes the update wait")
def test_caller_deadline_passing_is_deadline_exceeded(backend):
    stub = backend.stub
    account = create(stub)
    with row_lock(backend.url, account.id):
        request = pb.UpdateAdAccountRequest(ad_account=pb.AdAccount(id=account.id, name="blocked"))
        error = rpc_error(stub.UpdateAdAccount, request, timeout=0.3)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def first_failure(call, request, attempts: int = 50) -> grpc.RpcError | None:
    """The error of the first of `attempts` calls that fails: the blocked call may take
    a moment to hold the only connection."""
    for _ in range(attempts):
        try:
            call(request, timeout=5)
        except grpc.RpcError as error:
            return error
    return None


@pytest.mark.postgresql_only("a row lock held by another client keeps the pool's only connection busy")
def test_exhausted_pool_is_unavailable(backend):
    # One connection: an update stuck on a row lock holds it, and List reads through the same pool.
    running = RunningServer(server_settings(backend.url, DB_POOL_SIZE=1, DB_POOL_TIMEOUT=0.3))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.AdAccountServiceStub(channel)
            account = create(stub)
            with row_lock(backend.url, account.id):
                blocked = stub.UpdateAdAccount.future(
                    pb.UpdateAdAccountRequest(ad_account=pb.AdAccount(id=account.id, name="waits")), timeout=20
                )
                error = first_failure(stub.ListAdAccounts, pb.ListAdAccountsRequest())
                assert error is not None
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                assert_clean(error)
            assert blocked.result().name == "waits", "the blocked call completes once the lock goes"
    finally:
        running.stop()


@pytest.mark.postgresql_only("a table lock held by another client keeps the pool's only connection busy")
def test_a_point_read_waiting_for_the_only_connection_is_unavailable(backend):
    # One connection, held by a read stuck behind a table lock; the next read waits
    # DB_POOL_TIMEOUT, then UNAVAILABLE.
    running = RunningServer(server_settings(backend.url, DB_POOL_SIZE=1, DB_POOL_TIMEOUT=0.3))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.AdAccountServiceStub(channel)
            account = create(stub)
            with table_lock(backend.url):
                blocked = stub.GetAdAccount.future(pb.GetAdAccountRequest(id=account.id), timeout=20)
                error = first_failure(stub.GetAdAccount, pb.GetAdAccountRequest(id=account.id))
                assert error is not None
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                assert_clean(error)
            assert blocked.result() == account, "the blocked read completes once the lock goes"
            assert stub.GetAdAccount(pb.GetAdAccountRequest(id=account.id), timeout=5) == account
    finally:
        running.stop()


@pytest.mark.postgresql_only("a database without the schema: the server migrates a SQLite file itself as it starts")
def test_unexpected_failure_is_internal_with_an_error_id_and_no_detail(backend):
    # A database without the schema: every query fails in a way the service does not expect.
    name = f"adaccounts_test_noschema_{uuid.uuid4().hex[:8]}"
    url = create_database(ADMIN_URL, name)
    running = RunningServer(server_settings(url))
    try:
        with grpc.insecure_channel(running.target) as channel:
            error = rpc_error(
                pb_grpc.AdAccountServiceStub(channel).GetAdAccount, pb.GetAdAccountRequest(id=str(uuid.uuid4()))
            )
        assert error.code() == grpc.StatusCode.INTERNAL
        assert "error id" in error.details()
        assert_clean(error)
    finally:
        running.stop()
        drop_database(ADMIN_URL, name)
