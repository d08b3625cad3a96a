"""Making calls and reading their outcomes: accounts to create, errors, their details."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import grpc
import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

# What a caller must never see in an error message.
LEAKS = ("SELECT", "INSERT", "UPDATE ad_accounts", "ad_accounts", "psycopg", "Traceback", "127.0.0.1", "sqlalchemy")


def new_account(**fields: object) -> pb.AdAccount:
    """A valid account to create; fields override the defaults."""
    values: dict[str, object] = {
        "owner_id": str(uuid.uuid4()),
        "platform": pb.PLATFORM_META,
        "external_id": f"act_{uuid.uuid4().hex[:10]}",
        "name": "Acme EU",
        "currency_code": "EUR",
        "time_zone": "Europe/Paris",
    }
    values.update(fields)
    return pb.AdAccount(**values)


def create(stub, **fields) -> pb.AdAccount:  # type: ignore[no-untyped-def]
    """Create new_account(**fields) through `stub`."""
    return stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account(**fields)))


def update_request(account_id: str, name: str) -> pb.UpdateAdAccountRequest:
    """An UpdateAdAccount of the name alone (empty mask: the fields set)."""
    return pb.UpdateAdAccountRequest(ad_account=pb.AdAccount(id=account_id, name=name))


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    """The error `call(*args, **kwargs)` raises; the test fails if it raises none."""
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value


def code_of(call: Callable[..., object], *args: object, **kwargs: object) -> tuple[grpc.StatusCode, str]:
    """How `call(*args, **kwargs)` ended: (OK, "") when it returned, else its error's code and details."""
    try:
        call(*args, **kwargs)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def field_violations(error: grpc.RpcError) -> dict[str, str]:
    """The google.rpc.BadRequest field violations an INVALID_ARGUMENT carries."""
    status = rpc_status.from_call(error)
    assert status is not None, "INVALID_ARGUMENT must carry a google.rpc.Status"
    violations: dict[str, str] = {}
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        assert detail.Unpack(bad_request)
        violations.update({v.field: v.description for v in bad_request.field_violations})
    return violations


def assert_clean(error: grpc.RpcError) -> None:
    """Nothing internal (SQL, driver, host, traceback) in the error's message."""
    for leak in LEAKS:
        assert leak.lower() not in (error.details() or "").lower(), f"{leak!r} leaked: {error.details()}"
