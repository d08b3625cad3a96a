"""Opaque, tamper-evident page tokens bound to the filters and order of a List call.

A token carries the keyset position after the last row of a page. It is
signed with HMAC-SHA256 under PAGE_TOKEN_SECRET over the position *and* the
request's filter fingerprint, so a token that was altered, or is replayed with
other filters or another order, fails verification. Every replica shares the
secret, so any of them accepts a token another minted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

from .errors import InvalidArgument

# A position: the sort key of the last row returned (microseconds since the
# epoch for time orders, the name for name orders) and that row's id.
Position = tuple[int | str, str]

_MAC_BYTES = 16
_MAX_TOKEN_LENGTH = 2048
_VERSION = 1


class PageTokens:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def mint(self, fingerprint: str, position: Position) -> str:
        payload = json.dumps([_VERSION, *position], separators=(",", ":"), ensure_ascii=False).encode()
        return f"{_b64encode(payload)}.{_b64encode(self._mac(fingerprint, payload))}"

    def read(self, token: str, fingerprint: str) -> Position:
        """The position a token carries; INVALID_ARGUMENT if it was not minted for these filters."""
        try:
            if len(token) > _MAX_TOKEN_LENGTH:
                raise ValueError("too long")
            encoded_payload, encoded_mac = token.split(".")
            payload = _b64decode(encoded_payload)
            if not hmac.compare_digest(_b64decode(encoded_mac), self._mac(fingerprint, payload)):
                raise ValueError("bad signature")
            version, key, row_id = json.loads(payload)
            if version != _VERSION or not isinstance(key, int | str) or not isinstance(row_id, str):
                raise ValueError("bad payload")
        except ValueError:
            raise InvalidArgument.field(
                "page_token",
                "invalid page token: it was altered, or belongs to a call with other filters or order_by",
            ) from None
        return key, row_id

    def _mac(self, fingerprint: str, payload: bytes) -> bytes:
        message = fingerprint.encode() + b"\0" + payload
        return hmac.new(self._key, message, hashlib.sha256).digest()[:_MAC_BYTES]


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
