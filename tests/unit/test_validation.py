"""Validation as pure logic, no server: page token positions, names, time zones, mask indexes.

Issue 12, rows 10 and 11. A page token is signed, but the signing key may be public (the
development default is in the source), so a token's content is caller input like any other.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts_server import convert
from adaccounts_server.errors import InvalidArgument
from adaccounts_server.page_tokens import PageTokens, Position
from google.protobuf import field_mask_pb2
from helpers.rpc import new_account

KEY = b"unit-test-page-token-key"
ROW_ID = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"
TIME_ORDERS = ["create_time", "create_time desc", "update_time desc"]
NAME_ORDERS = ["name", "name desc"]
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def filters_for(order_by: str) -> convert.ListFilters:
    return convert.parse_list(pb.ListAdAccountsRequest(order_by=order_by))[0]


def signed(order_by: str, payload: bytes | str | object) -> str:
    """A token correctly signed under KEY for these filters, whatever its content: what anyone
    who knows the key (the public development default) can make. The format is the wire
    format (base64url(payload).base64url(HMAC-SHA256(key, fingerprint NUL payload)[:16]))."""
    if isinstance(payload, str):
        payload = payload.encode("utf-8", "surrogatepass")
    elif not isinstance(payload, bytes):
        payload = json.dumps(payload, separators=(",", ":")).encode()
    mac = hmac.new(KEY, filters_for(order_by).fingerprint().encode() + b"\0" + payload, hashlib.sha256).digest()

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return f"{b64(payload)}.{b64(mac[:16])}"


def read(order_by: str, token: str) -> Position:
    return PageTokens(KEY).read(token, filters_for(order_by))


def assert_invalid_token(order_by: str, token: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        read(order_by, token)
    assert [v.field for v in caught.value.violations] == ["page_token"]


# --- row 10: a page token's position ----------------------------------------------------------


MAX_MICROS = (datetime.max.replace(tzinfo=UTC) - EPOCH) // timedelta(microseconds=1)
MIN_MICROS = (datetime.min.replace(tzinfo=UTC) - EPOCH) // timedelta(microseconds=1)

K = "<a key valid for the order>"  # replaced by one in the test

ANY_ORDER_BAD_PAYLOADS = [
    # wrong shapes
    [1, K],
    [1, K, ROW_ID, "extra"],
    [],
    {"a": 1, "b": 2, "c": 3},
    '"abc"',
    1,
    None,
    # wrong version
    [2, K, ROW_ID],
    [True, K, ROW_ID],
    ["1", K, ROW_ID],
    [1.0, K, ROW_ID],
    # ids that are not the canonical UUIDs the server mints
    [1, K, "not-a-uuid"],
    [1, K, ""],
    [1, K, 5],
    [1, K, None],
    [1, K, [ROW_ID]],
    [1, K, ROW_ID.upper()],
    [1, K, ROW_ID.replace("-", "")],
    [1, K, "{" + ROW_ID + "}"],
    [1, K, "urn:uuid:" + ROW_ID],
]
TIME_KEY_BAD_PAYLOADS = [
    [1, "abc", ROW_ID],
    [1, "2026-01-01T00:00:00Z", ROW_ID],
    [1, 10**30, ROW_ID],
    [1, -(10**30), ROW_ID],
    [1, 2**63, ROW_ID],
    [1, MAX_MICROS + 1, ROW_ID],
    [1, MIN_MICROS - 1, ROW_ID],
    [1, True, ROW_ID],
    [1, 1.5, ROW_ID],
    [1, None, ROW_ID],
    [1, [0], ROW_ID],
]
NAME_KEY_BAD_PAYLOADS = [
    [1, 5, ROW_ID],
    [1, 1.5, ROW_ID],
    [1, None, ROW_ID],
    [1, True, ROW_ID],
    [1, ["a"], ROW_ID],
    [1, "a\x00b", ROW_ID],  # PostgreSQL text cannot hold NUL
    [1, "x" * 201, ROW_ID],  # longer than any name
]
RAW_BAD_PAYLOADS = [
    "[" * 1500,  # nested deeper than the JSON parser recurses
    "[1," + "9" * 1400 + ',"' + ROW_ID + '"]',  # more digits than int() converts
    '[1,NaN,"' + ROW_ID + '"]',
    '[1,Infinity,"' + ROW_ID + '"]',
    '[1,"\\ud800","' + ROW_ID + '"]',  # a lone surrogate: not encodable text
    b"\xff\xfe\x00",
    "",
]


@pytest.mark.parametrize("order_by", TIME_ORDERS + NAME_ORDERS)
@pytest.mark.parametrize("payload", ANY_ORDER_BAD_PAYLOADS + RAW_BAD_PAYLOADS, ids=lambda p: repr(p)[:60])
def test_signed_token_with_a_malformed_position_is_invalid_argument(order_by, payload):
    if isinstance(payload, list):
        payload = [("alpha" if order_by in NAME_ORDERS else 0) if item is K else item for item in payload]
    assert_invalid_token(order_by, signed(order_by, payload))


@pytest.mark.parametrize("order_by", TIME_ORDERS)
@pytest.mark.parametrize("payload", TIME_KEY_BAD_PAYLOADS, ids=repr)
def test_signed_token_with_a_bad_time_key_is_invalid_argument(order_by, payload):
    assert_invalid_token(order_by, signed(order_by, payload))


@pytest.mark.parametrize("order_by", NAME_ORDERS)
@pytest.mark.parametrize("payload", NAME_KEY_BAD_PAYLOADS, ids=repr)
def test_signed_token_with_a_bad_name_key_is_invalid_argument(order_by, payload):
    assert_invalid_token(order_by, signed(order_by, payload))


@pytest.mark.parametrize("order_by", TIME_ORDERS)
@pytest.mark.parametrize("micros", [0, 1_767_225_600_123_456, -1, MIN_MICROS, MAX_MICROS])
def test_time_position_decodes_to_an_aware_datetime_and_a_uuid(order_by, micros):
    position = read(order_by, signed(order_by, [1, micros, ROW_ID]))
    assert position.key == EPOCH + timedelta(microseconds=micros)
    assert position.key.tzinfo is not None
    assert position.id == uuid.UUID(ROW_ID)


@pytest.mark.parametrize("order_by", NAME_ORDERS)
# Names stored before today's rules (a bidi override, a lone space) still resume a walk.
@pytest.mark.parametrize("name", ["alpha", "", " ", "\u202eevil", "émile 👩\u200d💻", "x" * 200])
def test_name_position_decodes_to_the_name_and_a_uuid(order_by, name):
    position = read(order_by, signed(order_by, [1, name, ROW_ID]))
    assert position == Position(name, uuid.UUID(ROW_ID))


@pytest.mark.parametrize(
    ("order_by", "key"),
    [("create_time", datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)), ("name desc", "Ärger")],
)
def test_minted_token_reads_back_as_the_same_position(order_by, key):
    tokens = PageTokens(KEY)
    position = Position(key, uuid.UUID(ROW_ID))
    token = tokens.mint(filters_for(order_by), position)
    assert tokens.read(token, filters_for(order_by)) == position
    # the wire format is unchanged, so tokens survive a rolling deploy in both directions
    wire_key = (key - EPOCH) // timedelta(microseconds=1) if isinstance(key, datetime) else key
    assert token == signed(order_by, json.dumps([1, wire_key, ROW_ID], separators=(",", ":"), ensure_ascii=False))


def test_token_for_other_filters_or_order_is_still_refused():
    token = signed("create_time", [1, 0, ROW_ID])
    assert_invalid_token("create_time desc", token)
    assert_invalid_token("name", token)
    with pytest.raises(InvalidArgument):
        PageTokens(b"another key").read(token, filters_for("create_time"))


# --- row 11: names -----------------------------------------------------------------------------


def create_request(**fields: object) -> pb.CreateAdAccountRequest:
    """helpers.rpc's valid account, with a fixed owner and external id, in a request."""
    return pb.CreateAdAccountRequest(ad_account=new_account(**{"owner_id": ROW_ID, "external_id": "act_1", **fields}))


def violations_of(request: pb.CreateAdAccountRequest | pb.UpdateAdAccountRequest) -> dict[str, str]:
    parse = convert.parse_create if isinstance(request, pb.CreateAdAccountRequest) else convert.parse_update
    with pytest.raises(InvalidArgument) as caught:
        parse(request)
    return {v.field: v.description for v in caught.value.violations}


BAD_NAMES = {
    "right-to-left override": "Acme \u202eRUE",
    "left-to-right embedding": "\u202aAcme",
    "pop directional formatting": "Acme\u202c",
    "left-to-right override": "\u202dAcme",
    "right-to-left embedding": "\u202bAcme",
    "right-to-left isolate": "Acme \u2067x\u2069",
    "first strong isolate": "\u2068Acme",
    "left-to-right mark": "Acme\u200e",
    "right-to-left mark": "\u200fAcme",
    "arabic letter mark": "Acme\u061c",
    "line separator": "Acme\u2028EU",
    "paragraph separator": "Acme\u2029EU",
    "unassigned code point": "Acme \u0378",
    "noncharacter": "Acme \ufdd0",
    "last code point": "Acme \U0010ffff",
    "only a space": " ",
    "only spaces": "     ",
    "only an ideographic space": "\u3000",
    "only a no-break space": "\u00a0",
    "only a zero width space": "\u200b",
    "only a byte order mark": "\ufeff",
    "only a word joiner": "\u2060",
    "only a soft hyphen": "\u00ad",
    "only invisible characters and spaces": " \u200b\ufeff\u2060 \u200d\u200c ",
    "only a hangul filler": "\u3164",
    "only a variation selector": "\ufe0f",
    "only a combining grapheme joiner": "\u034f",
}
GOOD_NAMES = {
    "ascii": "Acme EU",
    "latin": "Acme — Ünïcode ✓",
    "arabic": "شركة أكمي",
    "hebrew": "אקמי בע״מ",
    "persian with a zero width non-joiner": "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
    "emoji zwj sequence": "👩\u200d💻 team",
    "flag tag sequence": "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f Scotland",
    "surrounding spaces": "  Acme  ",
    "inner soft hyphen": "Ac\u00adme",
    "one character": "A",
    "longest": "n" * 200,
}


@pytest.mark.parametrize("name", BAD_NAMES.values(), ids=BAD_NAMES.keys())
def test_create_refuses_an_unsafe_or_blank_name(name):
    assert "ad_account.name" in violations_of(create_request(name=name))


@pytest.mark.parametrize("name", BAD_NAMES.values(), ids=BAD_NAMES.keys())
def test_update_refuses_an_unsafe_or_blank_name(name):
    request = pb.UpdateAdAccountRequest(ad_account=pb.AdAccount(id=ROW_ID, name=name))
    assert "ad_account.name" in violations_of(request)


@pytest.mark.parametrize("name", GOOD_NAMES.values(), ids=GOOD_NAMES.keys())
def test_ordinary_names_in_any_script_are_accepted_as_given(name):
    new, _ = convert.parse_create(create_request(name=name))
    assert new.name == name


def test_name_rules_still_refuse_control_characters_and_overlong_names():
    assert "ad_account.name" in violations_of(create_request(name="Acme\nEU"))
    assert "ad_account.name" in violations_of(create_request(name="n" * 201))


# --- row 11: time zones ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "time_zone",
    [
        "localtime",  # a symlink to the host's zone, on hosts that have one
        "posixrules",
        "Factory",  # a tz placeholder ("-00"), not a place
        "posix/Europe/Paris",
        "right/UTC",
        "zone.tab",
        "tzdata.zi",
        "leapseconds",
        "/etc/localtime",
        "../zoneinfo/UTC",
        "europe/paris",
        "Europe/Paris ",
    ],
)
def test_time_zone_that_is_not_an_iana_name_is_refused(time_zone):
    assert "ad_account.time_zone" in violations_of(create_request(time_zone=time_zone))


@pytest.mark.parametrize(
    "time_zone",
    ["Europe/Paris", "UTC", "Etc/UTC", "America/New_York", "Asia/Kolkata", "Etc/GMT+5", "US/Eastern", "GMT"],
)
def test_iana_time_zone_names_are_accepted(time_zone):
    new, _ = convert.parse_create(create_request(time_zone=time_zone))
    assert new.time_zone == time_zone


# --- row 11: update mask indexes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("paths", "expected"),
    [
        (["name", "name", "bogus"], {"update_mask.paths[2]"}),
        (["name", "bogus", "name", "owner_id", "bogus"], {"update_mask.paths[1]", "update_mask.paths[3]"}),
        (["status", "status", "status", "id"], {"update_mask.paths[3]"}),
    ],
)
def test_mask_violation_names_the_index_the_caller_sent(paths, expected):
    account = pb.AdAccount(id=ROW_ID, name="Acme", status=pb.STATUS_PAUSED)
    request = pb.UpdateAdAccountRequest(ad_account=account, update_mask=field_mask_pb2.FieldMask(paths=paths))
    assert {f for f in violations_of(request) if f.startswith("update_mask")} == expected
