"""Bearer tokens per calling service: who gets in, who may write, and what stays open to probes."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import uuid
from collections.abc import Iterator

import grpc
import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from adaccounts_server.config import SettingsError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers.rpc import code_of, new_account
from helpers.server import RunningServer
from helpers.settings import server_settings

READER = secrets.token_urlsafe(32)
WRITER = secrets.token_urlsafe(32)


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


AUTH_TOKENS = json.dumps(
    {
        sha256(READER): {"name": "billing", "scope": "read"},
        sha256(WRITER).upper(): {"name": "onboarding", "scope": "read-write"},  # hex in any case
    }
)


@pytest.fixture(scope="module")
def auth_server(database_url) -> Iterator[RunningServer]:
    running = RunningServer(server_settings(database_url, AUTH_TOKENS=AUTH_TOKENS))
    yield running
    running.stop()


@pytest.fixture
def auth_channel(auth_server, clean_db) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(auth_server.target) as channel:
        yield channel


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def code_with(call, request, metadata=None) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    """How the call ended with this metadata; an error never quotes a token."""
    code, details = code_of(call, request, metadata=metadata, timeout=5)
    assert READER not in details
    assert WRITER not in details
    return code


def every_call(stub: pb_grpc.AdAccountServiceStub, existing: pb.AdAccount):
    return {
        "GetAdAccount": (stub.GetAdAccount, pb.GetAdAccountRequest(id=existing.id)),
        "BatchGetAdAccounts": (stub.BatchGetAdAccounts, pb.BatchGetAdAccountsRequest(ids=[existing.id])),
        "ListAdAccounts": (stub.ListAdAccounts, pb.ListAdAccountsRequest()),
        "CreateAdAccount": (stub.CreateAdAccount, pb.CreateAdAccountRequest(ad_account=new_account())),
        "UpdateAdAccount": (
            stub.UpdateAdAccount,
            pb.UpdateAdAccountRequest(ad_account=pb.AdAccount(id=existing.id, name="renamed")),
        ),
        "DeleteAdAccount": (stub.DeleteAdAccount, pb.DeleteAdAccountRequest(id=existing.id)),
    }


def created(stub) -> pb.AdAccount:
    return stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account()), metadata=bearer(WRITER))


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        bearer("not-a-token"),
        bearer(READER + "x"),
        (("authorization", READER),),  # no scheme
        (("authorization", f"Basic {READER}"),),
        (("authorization", "Bearer "),),
        # Two values are refused whatever they are: which one would count is ambiguous.
        (*bearer(WRITER), *bearer(READER)),
        (*bearer(READER), *bearer(WRITER)),
        (*bearer(WRITER), *bearer(WRITER)),
    ],
    ids=["none", "unknown", "altered", "no-scheme", "basic", "empty", "two", "two-reversed", "same-twice"],
)
def test_missing_or_wrong_token_is_unauthenticated_on_every_rpc(auth_channel, metadata):
    stub = pb_grpc.AdAccountServiceStub(auth_channel)
    existing = created(stub)
    for name, (call, request) in every_call(stub, existing).items():
        assert code_with(call, request, metadata) == grpc.StatusCode.UNAUTHENTICATED, name
    assert stub.GetAdAccount(pb.GetAdAccountRequest(id=existing.id), metadata=bearer(READER)).name == existing.name


def test_read_scope_reads_and_may_not_write(auth_channel):
    stub = pb_grpc.AdAccountServiceStub(auth_channel)
    existing = created(stub)
    calls = every_call(stub, existing)
    codes = {name: code_with(call, request, bearer(READER)) for name, (call, request) in calls.items()}
    assert codes == {
        "GetAdAccount": grpc.StatusCode.OK,
        "BatchGetAdAccounts": grpc.StatusCode.OK,
        "ListAdAccounts": grpc.StatusCode.OK,
        "CreateAdAccount": grpc.StatusCode.PERMISSION_DENIED,
        "UpdateAdAccount": grpc.StatusCode.PERMISSION_DENIED,
        "DeleteAdAccount": grpc.StatusCode.PERMISSION_DENIED,
    }
    listed = stub.ListAdAccounts(pb.ListAdAccountsRequest(), metadata=bearer(READER)).ad_accounts
    assert [(a.id, a.name) for a in listed] == [(existing.id, existing.name)], "nothing was written"


def test_read_write_scope_does_everything(auth_channel):
    stub = pb_grpc.AdAccountServiceStub(auth_channel)
    existing = created(stub)
    calls = every_call(stub, existing)
    order = ["GetAdAccount", "BatchGetAdAccounts", "ListAdAccounts", "CreateAdAccount", "UpdateAdAccount"]
    for name in [*order, "DeleteAdAccount"]:
        call, request = calls[name]
        assert code_with(call, request, bearer(WRITER)) == grpc.StatusCode.OK, name


def test_permission_denied_names_the_caller_and_what_it_lacks(auth_channel):
    stub = pb_grpc.AdAccountServiceStub(auth_channel)
    with pytest.raises(grpc.RpcError) as raised:
        stub.DeleteAdAccount(pb.DeleteAdAccountRequest(id=str(uuid.uuid4())), metadata=bearer(READER), timeout=5)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "billing" in raised.value.details()
    assert "read-write" in raised.value.details()


def test_two_authorization_values_are_refused_saying_so(auth_channel):
    """A client that sends its default token beside a narrower one for the call must not get
    whichever the server happens to read first (a read-write token let a write through)."""
    stub = pb_grpc.AdAccountServiceStub(auth_channel)
    with pytest.raises(grpc.RpcError) as raised:
        stub.CreateAdAccount(
            pb.CreateAdAccountRequest(ad_account=new_account()), metadata=(*bearer(WRITER), *bearer(READER)), timeout=5
        )
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "one authorization value" in raised.value.details()
    assert list(stub.ListAdAccounts(pb.ListAdAccountsRequest(), metadata=bearer(WRITER)).ad_accounts) == []


def test_health_and_reflection_need_no_token(auth_channel):
    health = health_pb2_grpc.HealthStub(auth_channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    reflection = reflection_pb2_grpc.ServerReflectionStub(auth_channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (response,) = list(reflection.ServerReflectionInfo(iter([request]), timeout=5))
    assert "adaccounts.v1.AdAccountService" in {s.name for s in response.list_services_response.service}


def test_reflection_can_be_turned_off(database_url):
    running = RunningServer(server_settings(database_url, GRPC_REFLECTION=False))
    try:
        with grpc.insecure_channel(running.target) as channel:
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            with pytest.raises(grpc.RpcError) as raised:
                list(reflection.ServerReflectionInfo(iter([request]), timeout=5))
            assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
            health = health_pb2_grpc.HealthStub(channel)
            health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5)
    finally:
        running.stop()


def test_tokens_never_reach_the_logs(auth_channel, caplog):
    caplog.set_level(logging.DEBUG)
    stub = pb_grpc.AdAccountServiceStub(auth_channel)
    existing = created(stub)
    for token in (READER, WRITER, "wrong-token-value"):
        for call, request in every_call(stub, existing).values():
            code_with(call, request, bearer(token))
    for secret in (READER, WRITER, "wrong-token-value", sha256(READER), sha256(WRITER)):
        assert secret not in caplog.text


def test_authentication_is_off_without_auth_tokens(stub, server):
    """Without AUTH_TOKENS every call gets in, writes included, with no token or with any
    authorization value at all: nothing is checked, so nothing is refused."""
    assert server.app.settings.AUTH_TOKENS is None
    anything = [None, bearer("not-a-token"), (("authorization", "Basic abc"),), (*bearer(READER), *bearer(WRITER))]
    for metadata in anything:
        existing = created(stub)
        calls = every_call(stub, existing)
        codes = {name: code_with(call, request, metadata) for name, (call, request) in calls.items()}
        assert codes == dict.fromkeys(calls, grpc.StatusCode.OK), metadata


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{not json", "AUTH_TOKENS: not valid JSON"),
        ("{}", "AUTH_TOKENS: want a non-empty JSON object"),
        ('["a"]', "AUTH_TOKENS: want a non-empty JSON object"),
        (json.dumps({"abc": {"name": "x", "scope": "read"}}), "AUTH_TOKENS: entry 1: the key must be"),
        (json.dumps({sha256("t"): {"name": "x", "scope": "admin"}}), "AUTH_TOKENS: entry 1: scope must be"),
        (json.dumps({sha256("t"): {"name": "", "scope": "read"}}), "AUTH_TOKENS: entry 1: name must be"),
        (json.dumps({sha256("t"): {"name": "x"}}), "AUTH_TOKENS: entry 1: want"),
        (json.dumps({sha256("t"): "read"}), "AUTH_TOKENS: entry 1: want"),
    ],
)
def test_bad_auth_tokens_stop_the_start_in_one_line_without_the_value(database_url, value, message):
    with pytest.raises(SettingsError) as raised:
        server_settings(database_url, AUTH_TOKENS=value)
    assert str(raised.value).startswith(message), raised.value
    assert "\n" not in str(raised.value)
    assert sha256("t") not in str(raised.value)


def test_auth_tokens_never_in_repr_or_str(database_url):
    settings = server_settings(database_url, AUTH_TOKENS=AUTH_TOKENS)
    for text in (repr(settings), str(settings), str(settings.model_dump())):
        assert sha256(READER) not in text
        assert sha256(WRITER).upper() not in text
