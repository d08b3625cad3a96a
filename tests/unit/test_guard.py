"""The call guard's decisions as pure logic, no server: who a bearer token says is calling,
whether they may call the method, and which request id a call is logged and answered with.

(The same through a real server, every RPC: tests/test_auth.py, tests/test_request_ids.py.)
"""

from __future__ import annotations

import hashlib
import json

import grpc
import pytest
from adaccounts_server import guard
from adaccounts_server.config import load_settings

SERVICE = "/adaccounts.v1.AdAccountService/"
READS = [SERVICE + name for name in ("GetAdAccount", "BatchGetAdAccounts", "ListAdAccounts")]
WRITES = [SERVICE + name for name in ("CreateAdAccount", "UpdateAdAccount", "DeleteAdAccount")]
READER = "reader-token-0123456789abcdef"
WRITER = "writer-token-0123456789abcdef"


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def authenticator(tokens: dict[str, dict[str, str]] | None) -> guard.Authenticator:
    """The Authenticator as the server builds it from AUTH_TOKENS (None: unset)."""
    overrides = {} if tokens is None else {"AUTH_TOKENS": json.dumps(tokens)}
    settings = load_settings(
        _env_file=None, DATABASE_URL="postgresql://app@db/app", PAGE_TOKEN_SECRET="x" * 32, **overrides
    )
    return guard.Authenticator(settings.auth_tokens)


GUARD = authenticator(
    {
        sha256(READER): {"name": "billing", "scope": "read"},
        sha256(WRITER).upper(): {"name": "onboarding", "scope": "read-write"},  # hex in any case
    }
)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def refusal(metadata, method: str = READS[0]) -> guard.Refused:  # type: ignore[no-untyped-def]
    with pytest.raises(guard.Refused) as caught:
        GUARD.authenticate(metadata, method)
    for token in (READER, WRITER):
        assert token not in str(caught.value)
    return caught.value


def test_without_auth_tokens_everyone_may_call_everything_anonymously():
    off = authenticator(None)
    assert not off.enabled
    for metadata in (None, [], bearer("anything"), [*bearer(READER), *bearer(WRITER)], [("authorization", b"\x00")]):
        for method in READS + WRITES:
            assert off.authenticate(metadata, method) is None


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        [],
        [("x-request-id", "r1")],
        [("authorization", READER)],  # no scheme
        [("authorization", f"Basic {READER}")],
        [("authorization", "Bearer ")],
        [("authorization", "Bearer")],
        [("authorization", b"Bearer " + READER.encode())],  # a binary value is no token
    ],
    ids=["none", "empty", "other-keys", "no-scheme", "basic", "empty-token", "scheme-only", "bytes"],
)
def test_no_bearer_token_is_unauthenticated(metadata):
    refused = refusal(metadata)
    assert refused.code == grpc.StatusCode.UNAUTHENTICATED
    assert str(refused) == "a bearer token is required (authorization metadata)"
    assert refused.caller is None


@pytest.mark.parametrize("token", ["not-a-token", READER + "x", READER[:-1], READER.upper(), sha256(READER)])
def test_an_unknown_token_is_unauthenticated(token):
    refused = refusal(bearer(token))
    assert (refused.code, str(refused), refused.caller) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "the bearer token is not valid",
        None,
    )


@pytest.mark.parametrize(
    "metadata",
    [[*bearer(WRITER), *bearer(READER)], [*bearer(READER), *bearer(WRITER)], [*bearer(WRITER), *bearer(WRITER)]],
    ids=["writer-first", "reader-first", "same-twice"],
)
def test_two_authorization_values_are_refused_whatever_they_are(metadata):
    # A client's default token beside a narrower one for the call: which would count is a guess.
    refused = refusal(metadata, WRITES[0])
    assert (refused.code, str(refused)) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "send one authorization value, not several",
    )


@pytest.mark.parametrize(
    "value", [f"Bearer {READER}", f"bearer {READER}", f"BEARER   {READER}  ", f"  Bearer {READER}"]
)
def test_the_scheme_is_case_insensitive_and_spaces_around_are_ignored(value):
    assert GUARD.authenticate([("authorization", value)], READS[0]) == guard.Caller("billing", "read")


@pytest.mark.parametrize("method", READS)
def test_read_scope_may_read(method):
    assert GUARD.authenticate(bearer(READER), method) == guard.Caller("billing", "read")


@pytest.mark.parametrize("method", WRITES)
def test_read_scope_may_not_write_and_is_told_what_it_lacks(method):
    refused = refusal(bearer(READER), method)
    assert refused.code == grpc.StatusCode.PERMISSION_DENIED
    assert str(refused) == f"caller 'billing' may only read; {method.rsplit('/', 1)[1]} needs scope read-write"
    assert refused.caller == guard.Caller("billing", "read")  # known: the call's log line names it


@pytest.mark.parametrize("method", READS + WRITES)
def test_read_write_scope_may_call_everything(method):
    assert GUARD.authenticate(bearer(WRITER), method) == guard.Caller("onboarding", "read-write")


def test_the_write_methods_are_exactly_the_three_writes():
    assert frozenset(WRITES) == guard.WRITE_METHODS


def test_authentication_ignores_other_metadata():
    metadata = [("x-request-id", "r1"), *bearer(WRITER), ("user-agent", "grpc-python")]
    assert GUARD.authenticate(metadata, WRITES[2]) == guard.Caller("onboarding", "read-write")


# --- the request id ------------------------------------------------------------------------------


@pytest.mark.parametrize("rid", ["r1", "cli-1", "a" * 128, "Z9._:/+=@-", "01J9Z8X7W6V5"])
def test_a_tame_request_id_from_the_caller_is_kept(rid):
    assert guard._request_id([("authorization", "Bearer x"), ("x-request-id", rid)]) == rid


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        [],
        [("x-request-id", "")],
        [("x-request-id", "a" * 129)],
        [("x-request-id", "two words")],
        [("x-request-id", "line\nbreak")],
        [("x-request-id", "émile")],
        [("x-request-id", b"bytes")],
        [("x-request-id", "{json}")],
    ],
    ids=["none", "empty", "blank", "too-long", "space", "newline", "non-ascii", "bytes", "braces"],
)
def test_otherwise_the_call_gets_a_new_request_id(metadata):
    rid = guard._request_id(metadata)
    assert len(rid) == 32
    assert int(rid, 16) >= 0
    assert guard._request_id(metadata) != rid
