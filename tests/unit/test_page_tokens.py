"""adaccounts_server.page_tokens as pure logic, no server: a token minted for a List call reads
back as its position for that call only; altered, truncated or replayed with other filters it
is INVALID_ARGUMENT; and PAGE_TOKEN_SECRET's comma-separated keys rotate without breaking walks.

(A signed token whose content is hostile: tests/unit/test_validation.py.)
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts_server import convert
from adaccounts_server.config import SettingsError, load_settings
from adaccounts_server.errors import InvalidArgument
from adaccounts_server.page_tokens import PageTokens, Position

OLD = "page-key-being-retired-0123456789"
NEW = "page-key-taking-over-0123456789"
OTHER = "a-key-that-signed-neither-0123456789"
ROW_ID = uuid.UUID("3f2504e0-4f89-41d3-9a0c-0305e82c3301")
OWNER = "123e4567-e89b-12d3-a456-426614174000"


def filters(**fields: object) -> convert.ListFilters:
    return convert.parse_list(pb.ListAdAccountsRequest(**fields))[0]


def tokens(secret: str) -> PageTokens:
    """PageTokens as the server builds them from PAGE_TOKEN_SECRET."""
    settings = load_settings(_env_file=None, DATABASE_URL="postgresql://app@db/app", PAGE_TOKEN_SECRET=secret)
    return PageTokens(*settings.page_token_keys)


def refused(page_tokens: PageTokens, token: str, for_filters: convert.ListFilters) -> bool:
    with pytest.raises(InvalidArgument) as caught:
        page_tokens.read(token, for_filters)
    assert [v.field for v in caught.value.violations] == ["page_token"]
    return True


POSITIONS = {
    "create_time": Position(datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), ROW_ID),
    "create_time desc": Position(datetime(1969, 7, 20, 20, 17, 40, tzinfo=UTC), ROW_ID),
    "update_time desc": Position(datetime(2026, 2, 1, tzinfo=UTC), ROW_ID),
    "name": Position("Ärger", ROW_ID),
    "name desc": Position("émile 👩\u200d💻", ROW_ID),
}


@pytest.mark.parametrize("order_by", POSITIONS)
def test_a_token_reads_back_as_its_position_for_the_same_call(order_by):
    page_tokens = tokens(NEW)
    call = filters(order_by=order_by, owner_id=OWNER, platforms=[pb.PLATFORM_META], statuses=[pb.STATUS_ACTIVE])
    token = page_tokens.mint(call, POSITIONS[order_by])
    assert page_tokens.read(token, call) == POSITIONS[order_by]
    # Opaque, and fit for a URL or a header as it is.
    assert str(ROW_ID) not in token
    assert "Ärger" not in token
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")


def test_the_order_of_the_filter_lists_does_not_matter():
    page_tokens = tokens(NEW)
    token = page_tokens.mint(filters(platforms=[pb.PLATFORM_META, pb.PLATFORM_X]), POSITIONS["create_time"])
    assert page_tokens.read(token, filters(platforms=[pb.PLATFORM_X, pb.PLATFORM_META])) == POSITIONS["create_time"]


@pytest.mark.parametrize(
    "other",
    [
        {"order_by": "create_time desc"},
        {"owner_id": OWNER},
        {"platforms": [pb.PLATFORM_META]},
        {"statuses": [pb.STATUS_PAUSED]},
    ],
    ids=lambda other: next(iter(other)),
)
def test_a_token_replayed_with_other_filters_or_order_is_refused(other):
    page_tokens = tokens(NEW)
    token = page_tokens.mint(filters(), POSITIONS["create_time"])
    assert refused(page_tokens, token, filters(**other))


def flip(text: str, index: int) -> str:
    return text[:index] + ("A" if text[index] != "A" else "B") + text[index + 1 :]


def test_an_altered_or_malformed_token_is_refused():
    page_tokens = tokens(NEW)
    call = filters(order_by="name")
    token = page_tokens.mint(call, POSITIONS["name"])
    payload, mac = token.split(".")
    for bad in [
        f"{flip(payload, len(payload) // 2)}.{mac}",
        f"{payload}.{flip(mac, len(mac) // 2)}",  # a middle character: the last may carry padding bits only
        f"{payload}.{mac[:-2]}",
        f"{payload[:-1]}.{mac}",
        payload,
        f"{payload}.{mac}.{mac}",
        f".{mac}",
        "",
        "not-a-token",
        "é" * 10,
        "x" * 5000,
        f"{payload}.{mac}" + "=" * 3000,
    ]:
        assert refused(page_tokens, bad, call), bad


def test_rotation_new_key_added_then_swapped_first_then_old_dropped():
    """README, "Rotating the page-token key": every step accepts the tokens of the step before."""
    call = filters()
    position = POSITIONS["create_time"]
    before, added, swapped, dropped = tokens(OLD), tokens(f"{OLD},{NEW}"), tokens(f"{NEW},{OLD}"), tokens(NEW)

    old_token = before.mint(call, position)
    assert added.mint(call, position) == old_token, "the first key signs"
    for step in (added, swapped):
        assert step.read(old_token, call) == position

    new_token = swapped.mint(call, position)
    assert new_token != old_token
    for step in (added, swapped, dropped):
        assert step.read(new_token, call) == position
    assert refused(before, new_token, call)  # a replica not yet given the new key

    assert refused(dropped, old_token, call)
    foreign = tokens(OTHER).mint(call, position)
    for step in (before, added, swapped, dropped):
        assert refused(step, foreign, call)


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        ("sh0rt!", "PAGE_TOKEN_SECRET: must be at least 16 characters"),
        (f"{NEW},", "PAGE_TOKEN_SECRET: key 2 of 2 is empty"),
        (f"{NEW}, {OLD}", "PAGE_TOKEN_SECRET: key 2 of 2 begins or ends with whitespace"),
        (f"{NEW},sh0rt!", "PAGE_TOKEN_SECRET: key 2 of 2 is shorter than 16 characters"),
    ],
)
def test_a_bad_key_list_is_refused_naming_the_key_by_position_only(secret, message):
    with pytest.raises(SettingsError) as raised:
        tokens(secret)
    assert str(raised.value).startswith(message), raised.value
    for key in (NEW, OLD, "sh0rt!"):
        assert key not in str(raised.value)


def test_the_keys_never_show():
    page_tokens = tokens(f"{NEW},{OLD}")
    assert repr(page_tokens) == str(page_tokens) == "PageTokens(<2 key(s)>)"
    with pytest.raises(ValueError, match="at least one key"):
        PageTokens()
