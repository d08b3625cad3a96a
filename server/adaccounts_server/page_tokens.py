"""Opaque, tamper-evident page tokens bound to the filters and order of a List call.

A token carries the keyset position after the last row of a page. It is
signed with HMAC-SHA256 under PAGE_TOKEN_SECRET over the position *and* the
request's filter fingerprint, so a token that was altered, or is replayed with
other filters or another order, fails verification. Every replica shares the
secret, so any of them accepts a token another minted.

PAGE_TOKEN_SECRET may hold several keys, separated by commas: tokens are signed
with the first and accepted under any of them, so the key can be rotated
without breaking the walks in progress (docs/deploying.md, "Rotating the page-token key").

A signature proves who made a token, not that its content is sound: the
development secret is public, and a leaked one is a secret no more. So what a
token holds is decoded like any caller input, into a position typed for the
order (an aware datetime or a name, and a UUID), or INVALID_ARGUMENT; the
repository only ever sees a valid position.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from . import models
from .domain import ListFilters
from .errors import InvalidArgument


class Position(NamedTuple):
    """Where a page ends: the sort key of its last row (an aware UTC datetime for time
    orders, the name for name orders) and that row's id."""

    key: datetime | str
    id: uuid.UUID
    # The WAL position of the database state the page was read at (with read replicas): the
    # next page is read from a database at least that far along, so a walk never goes back.
    lsn: int | None = None


_MAC_BYTES = 16
_MAX_TOKEN_LENGTH = 2048
_VERSION = 1
# On the wire a time key is microseconds since the epoch; any datetime Python can hold is one.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_MIN_MICROS = (datetime.min.replace(tzinfo=UTC) - _EPOCH) // _MICROSECOND
_MAX_MICROS = (datetime.max.replace(tzinfo=UTC) - _EPOCH) // _MICROSECOND


class _Invalid(Exception):
    """The token is not one this server would have minted for the call."""


class PageTokens:
    def __init__(self, *keys: bytes) -> None:
        """`keys[0]` signs the tokens minted here; a token signed with any of `keys` is accepted."""
        if not keys:
            raise ValueError("PageTokens needs at least one key")
        self._keys = keys

    def __repr__(self) -> str:  # never the keys themselves
        return f"PageTokens(<{len(self._keys)} key(s)>)"

    def mint(self, filters: ListFilters, position: Position) -> str:
        content: list[object] = [_VERSION, _encode_key(position.key), str(position.id)]
        if position.lsn is not None:
            # Only with read replicas, so a release before them (a rolling deploy) never sees one.
            content.append(position.lsn)
        payload = json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode()
        return f"{_b64encode(payload)}.{_b64encode(self._mac(self._keys[0], filters.fingerprint(), payload))}"

    def read(self, token: str, filters: ListFilters) -> Position:
        """The position a token carries; INVALID_ARGUMENT if it was not minted for these
        filters, or does not hold a valid position for their order, signed or not."""
        try:
            if len(token) > _MAX_TOKEN_LENGTH:
                raise _Invalid("too long")
            encoded_payload, encoded_mac = token.split(".")
            payload = _b64decode(encoded_payload)
            if not self._signed(_b64decode(encoded_mac), filters.fingerprint(), payload):
                raise _Invalid("bad signature")
            return _position(payload, by_name=filters.sorts_by_name)
        except (_Invalid, ValueError, RecursionError):
            # ValueError: not base64, not UTF-8, not JSON; RecursionError: JSON nested too deep.
            raise InvalidArgument.field(
                "page_token",
                "invalid page token: it was altered, or belongs to a call with other filters or order_by",
            ) from None

    def _signed(self, mac: bytes, fingerprint: str, payload: bytes) -> bool:
        """Whether `mac` is the signature under one of the keys; every key is tried, each in
        constant time, so the time taken depends on the number of keys only."""
        found = False
        for key in self._keys:
            found |= hmac.compare_digest(mac, self._mac(key, fingerprint, payload))
        return found

    @staticmethod
    def _mac(key: bytes, fingerprint: str, payload: bytes) -> bytes:
        message = fingerprint.encode() + b"\0" + payload
        return hmac.new(key, message, hashlib.sha256).digest()[:_MAC_BYTES]


def _encode_key(key: datetime | str) -> int | str:
    if isinstance(key, datetime):
        return (key - _EPOCH) // _MICROSECOND
    return key


def _position(payload: bytes, *, by_name: bool) -> Position:
    """The position in a token's payload, `[version, key, id]` or `[version, key, id, lsn]`,
    checked value by value."""
    content = json.loads(payload.decode())
    if not isinstance(content, list) or len(content) not in (3, 4):
        raise _Invalid("not [version, key, id(, lsn)]")
    version, key, row_id = content[:3]
    lsn = content[3] if len(content) == 4 else None
    if lsn is not None and (type(lsn) is not int or not 0 <= lsn < 2**64):
        raise _Invalid("lsn is not a WAL position")
    if type(version) is not int or version != _VERSION:
        raise _Invalid("unknown version")
    if not isinstance(row_id, str) or not _is_canonical_uuid(row_id):
        raise _Invalid("id is not a canonical UUID")
    if by_name:
        # Any text a name column could hold: PostgreSQL text has no NUL, and a lone surrogate
        # (JSON "\ud800") is no text at all. Today's name rules are not applied: a walk over
        # rows stored under older rules must still resume.
        if not isinstance(key, str) or len(key) > models.NAME_MAX or "\0" in key or not _encodable(key):
            raise _Invalid("name key is not a name")
        return Position(key, uuid.UUID(row_id), lsn)
    # type(): a bool is an int, and a float is not one; the range is what a datetime holds.
    if type(key) is not int or not _MIN_MICROS <= key <= _MAX_MICROS:
        raise _Invalid("time key is not a time")
    return Position(_EPOCH + key * _MICROSECOND, uuid.UUID(row_id), lsn)


def _is_canonical_uuid(text: str) -> bool:
    """The form the server mints: lowercase, hyphenated."""
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
