"""Hostile values that once got past validation (issue 12, rows 10 and 11), through a real
server on PostgreSQL: each must be INVALID_ARGUMENT naming the right field, never INTERNAL."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid

import grpc
import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from helpers.rpc import new_account
from helpers.settings import PAGE_TOKEN_SECRET


def invalid_argument_fields(call, request) -> set[str]:  # type: ignore[no-untyped-def]
    """The fields named by the INVALID_ARGUMENT that `call(request)` must answer."""
    with pytest.raises(grpc.RpcError) as caught:
        call(request)
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{error.code()}: {error.details()}"
    status = rpc_status.from_call(error)
    assert status is not None
    fields: set[str] = set()
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        assert detail.Unpack(bad_request)
        fields.update(v.field for v in bad_request.field_violations)
    return fields


# --- row 10: validly signed page tokens with hostile content -----------------------------------


def forged_token(order_by: str, payload: object) -> str:
    """A token signed with the server's secret for the default filters and this order, holding
    anything at all: what anyone can make when the secret is known (the development default
    is public). The wire format: base64url(payload).base64url(HMAC-SHA256(secret,
    fingerprint NUL payload)[:16]), the fingerprint being owner|platforms|statuses|order_by."""
    data = payload.encode() if isinstance(payload, str) else json.dumps(payload, separators=(",", ":")).encode()
    message = f"|||{order_by}".encode() + b"\0" + data
    mac = hmac.new(PAGE_TOKEN_SECRET.encode(), message, hashlib.sha256).digest()[:16]
    return ".".join(base64.urlsafe_b64encode(part).rstrip(b"=").decode() for part in (data, mac))


ROW_ID = str(uuid.uuid4())
HOSTILE_POSITIONS = [
    ("create_time", [1, "not a time", ROW_ID]),
    ("create_time", [1, 0, "not-a-uuid"]),
    ("create_time desc", [1, 10**30, ROW_ID]),
    ("update_time desc", [1, -(2**62), ROW_ID]),
    ("update_time desc", [1, 0, 12345]),
    ("name", [1, 1_700_000_000_000_000, ROW_ID]),
    ("name", [1, "a\x00b", ROW_ID]),
    ("name desc", '[1,"\\ud800","' + ROW_ID + '"]'),
    ("name", {"key": "a", "id": ROW_ID, "v": 1}),
    ("create_time", "[" * 1500),
]


def test_forged_token_for_a_valid_position_is_accepted(stub):
    """The forging recipe is right: a valid position signed this way pages like a real token."""
    accounts = sorted(
        (stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account(name=n))) for n in "abc"),
        key=lambda a: a.name,
    )
    page = stub.ListAdAccounts(
        pb.ListAdAccountsRequest(order_by="name", page_token=forged_token("name", [1, "a", accounts[0].id]))
    )
    assert [a.name for a in page.ad_accounts] == ["b", "c"]


@pytest.mark.parametrize(("order_by", "payload"), HOSTILE_POSITIONS, ids=lambda v: repr(v)[:40])
def test_signed_page_token_with_a_hostile_position_is_invalid_argument(stub, order_by, payload):
    stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account()))
    request = pb.ListAdAccountsRequest(order_by=order_by, page_token=forged_token(order_by, payload))
    assert invalid_argument_fields(stub.ListAdAccounts, request) == {"page_token"}


# --- row 11: names, time zones, mask indexes ---------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "Acme \u202eRUE",
        "\u2066Acme\u2069",
        "Acme\u2028EU",
        "Acme\u2029EU",
        "Acme \u0378",
        "   ",
        "\u200b",
        "\ufeff\u200b",
    ],
    ids=repr,
)
def test_create_and_update_refuse_unsafe_or_blank_names(stub, name):
    create = pb.CreateAdAccountRequest(ad_account=new_account(name=name))
    assert invalid_argument_fields(stub.CreateAdAccount, create) == {"ad_account.name"}
    created = stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account(name="Acme")))
    update = pb.UpdateAdAccountRequest(ad_account=pb.AdAccount(id=created.id, name=name))
    assert invalid_argument_fields(stub.UpdateAdAccount, update) == {"ad_account.name"}
    assert stub.GetAdAccount(pb.GetAdAccountRequest(id=created.id)) == created


def test_names_in_right_to_left_scripts_and_with_joiners_are_accepted(stub):
    for name in ["שלום עולם", "شركة أكمي", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", "👩\u200d💻 team"]:
        assert stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account(name=name))).name == name


@pytest.mark.parametrize("time_zone", ["localtime", "Factory", "posixrules", "posix/UTC"])
def test_time_zone_must_be_an_iana_name(stub, time_zone):
    create = pb.CreateAdAccountRequest(ad_account=new_account(time_zone=time_zone))
    assert invalid_argument_fields(stub.CreateAdAccount, create) == {"ad_account.time_zone"}
    created = stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account(time_zone="Etc/UTC")))
    update = pb.UpdateAdAccountRequest(ad_account=pb.AdAccount(id=created.id, time_zone=time_zone))
    assert invalid_argument_fields(stub.UpdateAdAccount, update) == {"ad_account.time_zone"}


def test_mask_violation_names_the_index_of_the_bad_path(stub):
    created = stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account()))
    request = pb.UpdateAdAccountRequest(
        ad_account=pb.AdAccount(id=created.id, name="Renamed"),
        update_mask=field_mask_pb2.FieldMask(paths=["name", "name", "bogus"]),
    )
    assert invalid_argument_fields(stub.UpdateAdAccount, request) == {"update_mask.paths[2]"}
