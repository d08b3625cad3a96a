"""The client package (clients/adaccounts) against the real server and PostgreSQL:
every method, the page walker, the exception for each status, load spreading, TLS
and metadata. Retries across a restart: test_client_retry.py; asyncio:
test_client_aio.py; the install without the server's dependencies: test_client_install.py."""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import re
import subprocess
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import adaccounts
import grpc
import psycopg
import pytest
from adaccounts import (
    PLATFORM_GOOGLE,
    PLATFORM_META,
    PLATFORM_TIKTOK,
    STATUS_ACTIVE,
    STATUS_PAUSED,
    Aborted,
    AdAccountsClient,
    AdAccountsError,
    AlreadyExists,
    AsyncAdAccountsClient,
    ClientClosed,
    Conflict,
    ConnectionFailed,
    DeadlineExceeded,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    tls_credentials,
)
from adaccounts._common import channel_options
from adaccounts.v1 import ad_accounts_pb2 as pb
from google.rpc import status_pb2
from helpers.clients import CLIENTS, LIST_METHOD, FakeServer
from helpers.polling import wait_until
from helpers.ports import free_port
from helpers.rpc import new_account
from helpers.server import RunningServer
from helpers.settings import server_settings


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[AdAccountsClient]:
    with AdAccountsClient(server.target) as client:
        yield client


class CallRecorder(grpc.UnaryUnaryClientInterceptor):
    """Sees each call as the client hands it to gRPC: method, deadline, metadata."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def intercept_unary_unary(self, continuation, client_call_details, request):
        self.calls.append(client_call_details)
        return continuation(client_call_details, request)

    def methods(self) -> list[str]:
        return [call.method for call in self.calls]


# --- every method ----------------------------------------------------------------------------


def test_create_then_get_returns_the_stored_account(client, clean_db):
    created = client.create(new_account(name="Acme EU", currency_code="eur"))
    assert uuid.UUID(created.id)
    assert created.currency_code == "EUR"
    assert created.status == STATUS_ACTIVE
    assert created.etag
    assert client.get(created.id) == created
    assert client.get(created.id.upper()) == created


def test_create_with_the_same_request_id_returns_the_first_account(client, clean_db):
    request_id = str(uuid.uuid4())
    account = new_account()
    first = client.create(account, request_id=request_id)
    again = client.create(account, request_id=request_id)
    assert again == first


def test_creates_without_a_request_id_get_a_fresh_one_each(client, clean_db):
    """The default request_id makes retries safe but never merges two different creates."""
    account = new_account()
    client.create(account)
    with pytest.raises(AlreadyExists):
        client.create(account)


def test_batch_get_returns_accounts_in_the_order_asked(client, clean_db):
    ids = [client.create(new_account()).id for _ in range(5)]
    order = [ids[3], ids[0], ids[4], ids[1]]
    assert [a.id for a in client.batch_get(order)] == order
    assert client.batch_get([]) == []


def test_batch_get_with_a_missing_id_raises_not_found_naming_it(client, clean_db):
    present = client.create(new_account()).id
    missing = str(uuid.uuid4())
    with pytest.raises(NotFound) as caught:
        client.batch_get([present, missing])
    assert missing in caught.value.details


def test_list_returns_one_page_with_filters_and_order(client, clean_db):
    owner = str(uuid.uuid4())
    for name, platform, status in [
        ("c", PLATFORM_META, STATUS_ACTIVE),
        ("a", PLATFORM_GOOGLE, STATUS_PAUSED),
        ("b", PLATFORM_META, STATUS_PAUSED),
        ("d", PLATFORM_TIKTOK, STATUS_PAUSED),
    ]:
        client.create(new_account(owner_id=owner, name=name, platform=platform, status=status))
    client.create(new_account(name="other owner"))

    page = client.list(owner_id=owner, order_by="name", page_size=2)
    assert [a.name for a in page.ad_accounts] == ["a", "b"]
    rest = client.list(owner_id=owner, order_by="name", page_size=2, page_token=page.next_page_token)
    assert [a.name for a in rest.ad_accounts] == ["c", "d"]
    assert rest.next_page_token == ""

    filtered = client.list(
        owner_id=owner, platforms=[PLATFORM_META, "PLATFORM_GOOGLE"], statuses=[STATUS_PAUSED], order_by="name desc"
    )
    assert [a.name for a in filtered.ad_accounts] == ["b", "a"]


def test_update_with_a_mask_changes_only_the_masked_fields(client, clean_db):
    created = client.create(new_account(name="before", time_zone="UTC"))
    change = pb.AdAccount(id=created.id, name="after", time_zone="Europe/Paris")
    updated = client.update(change, update_mask=["name"])
    assert (updated.name, updated.time_zone) == ("after", "UTC")
    assert updated.etag != created.etag


def test_update_without_a_mask_changes_every_field_that_is_set(client, clean_db):
    created = client.create(new_account(name="before", time_zone="UTC", currency_code="EUR"))
    updated = client.update(pb.AdAccount(id=created.id, name="after", time_zone="Asia/Tokyo", etag=created.etag))
    assert (updated.name, updated.time_zone, updated.currency_code) == ("after", "Asia/Tokyo", "EUR")
    assert client.get(created.id) == updated


def test_update_and_delete_with_a_stale_etag_raise_aborted(client, clean_db):
    created = client.create(new_account())
    client.update(pb.AdAccount(id=created.id, name="changed"), update_mask=["name"])
    stale = pb.AdAccount(id=created.id, name="mine", etag=created.etag)
    with pytest.raises(Aborted) as caught:
        client.update(stale, update_mask=["name"])
    assert caught.value.code == grpc.StatusCode.ABORTED
    with pytest.raises(Conflict):  # the same class, by its 1.0 name
        client.delete(created.id, etag=created.etag)
    assert client.get(created.id).name == "changed"


def test_delete_removes_the_account(client, clean_db):
    created = client.create(new_account())
    assert client.delete(created.id, etag=created.etag) is None
    with pytest.raises(NotFound):
        client.get(created.id)
    with pytest.raises(NotFound):
        client.delete(created.id)


# --- the page walker -------------------------------------------------------------------------

BULK_ROWS = 3000


@pytest.fixture
def bulk(database_url, clean_db) -> list[str]:
    """3000 rows in one INSERT, seven per create_time (ties broken by id), owners and
    statuses alternating; returns the two owner ids."""
    owners = [str(uuid.uuid4()), str(uuid.uuid4())]
    dsn = database_url.set(drivername="postgresql").render_as_string(False)
    # psycopg 3: leaving the block commits, then closes the connection.
    with psycopg.connect(dsn) as connection, connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO ad_accounts (id, owner_id, platform, external_id, name, currency_code, time_zone,"
            " status, create_time, update_time, version)"
            " SELECT gen_random_uuid(), (ARRAY[%s, %s]::uuid[])[i %% 2 + 1], 'META', 'bulk_' || i, 'bulk ' || i,"
            " 'EUR', 'UTC', (ARRAY['ACTIVE', 'PAUSED', 'ARCHIVED'])[i %% 3 + 1],"
            " '2026-01-01'::timestamptz + (i / 7) * interval '1 second', '2026-02-01'::timestamptz, 1"
            " FROM generate_series(1, %s) AS i",
            (*owners, BULK_ROWS),
        )
    return owners


def test_iter_ad_accounts_walks_thousands_of_rows_once_each_and_lazily(server, bulk):
    recorder = CallRecorder()
    with AdAccountsClient(server.target, interceptors=[recorder]) as client:
        walk = client.iter_ad_accounts(page_size=100)
        assert recorder.calls == []  # nothing is fetched before the first item is asked for

        first = list(itertools.islice(walk, 150))
        assert recorder.methods() == [LIST_METHOD] * 2  # the second page, only because item 101 was asked for

        accounts = first + list(walk)
        assert recorder.methods() == [LIST_METHOD] * (BULK_ROWS // 100)

    ids = [a.id for a in accounts]
    assert len(ids) == BULK_ROWS
    assert len(set(ids)) == BULK_ROWS
    keys = [(a.create_time.ToDatetime(), a.id) for a in accounts]
    assert keys == sorted(keys)


def test_iter_ad_accounts_sends_the_filters_with_every_page(client, bulk):
    """Page tokens are bound to the filters: a walker that dropped them on page two would be refused."""
    owner = bulk[0]
    walked = list(client.iter_ad_accounts(owner_id=owner, statuses=[STATUS_PAUSED], order_by="name", page_size=64))
    # owner[0] is i even, PAUSED is i % 3 == 1: i = 4, 10, 16, ... (i % 6 == 4)
    assert len(walked) == len([i for i in range(1, BULK_ROWS + 1) if i % 6 == 4])
    assert {a.owner_id for a in walked} == {owner}
    assert {a.status for a in walked} == {STATUS_PAUSED}
    assert [a.name.encode() for a in walked] == sorted(a.name.encode() for a in walked)


def test_iter_ad_accounts_on_an_empty_table_yields_nothing(client, clean_db):
    assert list(client.iter_ad_accounts()) == []


# --- one exception per status ------------------------------------------------------------------


def test_invalid_argument_carries_the_field_violations(client, clean_db):
    with pytest.raises(InvalidArgument) as caught:
        client.get("not-a-uuid")
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in error.field_violations] == ["id"]
    assert isinstance(error.status, status_pb2.Status)
    assert error.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert error.details == error.status.message
    assert isinstance(error.__cause__, grpc.RpcError)

    with pytest.raises(InvalidArgument) as caught:
        client.create(pb.AdAccount(owner_id=str(uuid.uuid4()), name="no platform", currency_code="EURO"))
    fields = {v.field for v in caught.value.field_violations}
    assert {"ad_account.platform", "ad_account.currency_code"} <= fields
    assert all(isinstance(v, FieldViolation) and v.description for v in caught.value.field_violations)


def test_not_found_already_exists_and_aborted_keep_code_details_and_request_id(client, clean_db):
    missing = str(uuid.uuid4())
    with pytest.raises(NotFound) as not_found:
        client.get(missing)
    assert not_found.value.code == grpc.StatusCode.NOT_FOUND
    assert missing in not_found.value.details
    assert re.fullmatch(r"[0-9a-f]{32}", not_found.value.request_id or "")
    assert not_found.value.request_id in str(not_found.value)  # quoted with the message

    account = new_account()
    client.create(account)
    with pytest.raises(AlreadyExists) as exists:
        client.create(account)
    assert exists.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert account.external_id in exists.value.details

    assert Conflict is Aborted  # the 1.0 name of the class, kept


def test_the_request_id_is_the_servers_and_a_callers_own_is_kept(server, clean_db):
    """The client sends an x-request-id with every call (the caller's own when it gives one); the
    server logs the call under it and returns it in the trailers, which is what the error carries
    (a server that made up its own would return that one instead)."""
    recorder = CallRecorder()
    with AdAccountsClient(server.target, interceptors=[recorder]) as client:
        with pytest.raises(NotFound) as generated:
            client.get(str(uuid.uuid4()))
        with pytest.raises(NotFound) as own:
            client.get(str(uuid.uuid4()), metadata=[("x-request-id", "job-42.attempt-1")])
    sent = [dict(call.metadata)["x-request-id"] for call in recorder.calls]
    assert generated.value.request_id == sent[0]
    assert own.value.request_id == sent[1] == "job-42.attempt-1"


def test_every_error_class_maps_its_status_and_all_are_adaccounts_errors():
    by_code = {
        grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
        grpc.StatusCode.NOT_FOUND: NotFound,
        grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
        grpc.StatusCode.ABORTED: Aborted,
        grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
        grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
        grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
        grpc.StatusCode.INTERNAL: Internal,
        grpc.StatusCode.UNAVAILABLE: Unavailable,
        grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
        grpc.StatusCode.UNIMPLEMENTED: AdAccountsError,
    }
    with FakeServer(lambda code=None: None) as fake:
        for code, error_class in by_code.items():
            fake.behaviour = lambda request, context, code=code: context.abort(code, f"{code.name} from the fake")
            with AdAccountsClient(fake.target, retry=None) as client, pytest.raises(AdAccountsError) as caught:
                client.delete(str(uuid.uuid4()))
            assert type(caught.value) is error_class, code
            assert caught.value.code == code
    assert issubclass(ConnectionFailed, Unavailable)
    for name in adaccounts.__all__:
        exported = getattr(adaccounts, name)
        if isinstance(exported, type) and issubclass(exported, Exception):
            assert issubclass(exported, AdAccountsError), name


def test_internal_carries_the_servers_error_id_and_request_id():
    def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.set_trailing_metadata((("x-request-id", "rid-from-server"),))
        context.abort(grpc.StatusCode.INTERNAL, "internal error (error id 0123456789abcdef)")

    with FakeServer(fail) as fake, AdAccountsClient(fake.target) as client, pytest.raises(Internal) as caught:
        client.get(str(uuid.uuid4()))
    assert caught.value.error_id == "0123456789abcdef"
    assert caught.value.request_id == "rid-from-server"


def test_no_server_raises_connection_failed_naming_the_cause():
    """Never reached a server: its own class (an Unavailable), gRPC's reason in the message."""
    with AdAccountsClient(f"127.0.0.1:{free_port()}", connect_timeout=0.2) as client:
        with pytest.raises(ConnectionFailed) as caught:
            client.get(str(uuid.uuid4()))
        with pytest.raises(Unavailable):  # what 1.0 callers catch
            client.delete(str(uuid.uuid4()))
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert "Connection refused" in caught.value.details
    assert "never sent" in caught.value.details
    assert caught.value.status is None  # no server, so no google.rpc.Status
    assert caught.value.request_id is None  # and no request id: it never left the client


def test_a_deadline_passed_at_a_server_raises_deadline_exceeded_with_the_request_id():
    """Reached a server, which did not answer in time: the outcome is unknown (DeadlineExceeded),
    and the error names the request id the server saw."""
    seen: list[str] = []

    def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.append(dict(context.invocation_metadata())["x-request-id"])
        time.sleep(1.0)  # deliberately slower than the client's 0.3 s deadline
        return b""

    with FakeServer(slow) as fake, AdAccountsClient(fake.target, timeout=0.3) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as caught:
            client.update(new_account(id=str(uuid.uuid4())))
        assert time.monotonic() - started < 0.6
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert seen
    assert caught.value.request_id == seen[0]


def test_resource_exhausted_has_its_class(client, clean_db):
    """A request over gRPC's 4 MiB limit; overload shedding (MAX_CONCURRENT_RPCS) is the other case."""
    with pytest.raises(ResourceExhausted) as caught:
        client.create(new_account(name="x" * (5 * 1024 * 1024)))
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


# --- every failure is an AdAccountsError --------------------------------------------------------


def test_a_closed_client_raises_client_closed_from_every_method(server):
    client = AdAccountsClient(server.target)
    client.close()
    account = new_account(id=str(uuid.uuid4()))
    calls = [
        lambda: client.get(account.id),
        lambda: client.batch_get([account.id]),
        lambda: client.list(),
        lambda: list(client.iter_ad_accounts()),
        lambda: client.create(account),
        lambda: client.update(account),
        lambda: client.delete(account.id),
    ]
    for call in calls:
        with pytest.raises(ClientClosed) as caught:
            call()
        assert caught.value.code == grpc.StatusCode.CANCELLED


def test_closing_the_client_cancels_a_call_in_progress_with_client_closed():
    arrived = threading.Event()

    def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
        arrived.set()
        time.sleep(2)  # deliberately: still answering when the client closes
        return b""

    with FakeServer(slow) as fake:
        client = AdAccountsClient(fake.target)
        with ThreadPoolExecutor(1) as pool:
            call = pool.submit(client.get, str(uuid.uuid4()))
            assert arrived.wait(5), "the call never reached the server"
            client.close()
            with pytest.raises(ClientClosed):
                call.result(5)


def test_closing_the_client_ends_a_wait_for_a_connection_with_client_closed():
    client = AdAccountsClient(f"127.0.0.1:{free_port()}", connect_timeout=10)
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(client.get, str(uuid.uuid4()))
        wait_until(call.running, message="the call to start")
        # Deliberately: a wait for a connection that never comes leaves nothing to observe.
        time.sleep(0.3)
        started = time.monotonic()
        client.close()
        with pytest.raises(ClientClosed):
            call.result(5)
        assert time.monotonic() - started < 1.5


def test_a_channel_gone_idle_connects_again_for_the_next_call(server, clean_db):
    """gRPC drops the connection of a channel unused for grpc.client_idle_timeout_ms (30 min by
    default); the next call asks for a new one rather than waiting out connect_timeout."""
    with AdAccountsClient(server.target, options=[("grpc.client_idle_timeout_ms", 1000)]) as client:
        client.list(page_size=1)
        time.sleep(2.5)  # deliberately idle past grpc.client_idle_timeout_ms (1 s here)
        started = time.monotonic()
        client.list(page_size=1)
        assert time.monotonic() - started < 1.0


def test_bad_enum_names_and_argument_types_raise_invalid_argument_before_sending(server):
    """The hint says `Platform | str`: the str is the value's name as in the proto, as the
    generated messages take it ("PLATFORM_META"); anything else is refused by the client."""
    recorder = CallRecorder()
    with AdAccountsClient(server.target, interceptors=[recorder]) as client:
        with pytest.raises(InvalidArgument) as caught:
            client.list(platforms=["META"], statuses=["ACTIVE", STATUS_PAUSED])
        assert [v.field for v in caught.value.field_violations] == ["platforms", "statuses"]
        assert "PLATFORM_META" in caught.value.field_violations[0].description
        with pytest.raises(InvalidArgument):
            list(client.iter_ad_accounts(statuses=["nope"]))
        with pytest.raises(InvalidArgument):
            client.get(123)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            client.batch_get([None])  # type: ignore[list-item]
        assert recorder.calls == []  # none of them was sent
        client.list(platforms=["PLATFORM_META", PLATFORM_GOOGLE], statuses=["STATUS_ACTIVE"])


# --- metadata and tokens --------------------------------------------------------------------------


def test_a_calls_own_token_replaces_the_providers(database_url, clean_db):
    """With a read-write token from the provider and a read-only one on the call, the call is
    made with the read-only one alone: the create is refused."""
    reader, writer = "reader-" + uuid.uuid4().hex, "writer-" + uuid.uuid4().hex
    tokens = {
        hashlib.sha256(reader.encode()).hexdigest(): {"name": "billing", "scope": "read"},
        hashlib.sha256(writer.encode()).hexdigest(): {"name": "onboarding", "scope": "read-write"},
    }
    running = RunningServer(server_settings(database_url, AUTH_TOKENS=json.dumps(tokens)))
    recorder = CallRecorder()
    try:
        with AdAccountsClient(
            running.target,
            metadata_provider=lambda: [("authorization", f"Bearer {writer}")],
            interceptors=[recorder],
        ) as client:
            with pytest.raises(PermissionDenied) as caught:
                client.create(new_account(), metadata=[("Authorization", f"Bearer {reader}")])
            assert "billing" in caught.value.details
            created = client.create(new_account())  # the provider's token, when the call has none
            assert client.get(created.id, metadata=[("authorization", f"Bearer {reader}")]) == created
            with pytest.raises(Unauthenticated):
                client.get(created.id, metadata=[("authorization", "Bearer not-a-token")])
        authorizations = [[v for k, v in call.metadata if k == "authorization"] for call in recorder.calls]
        assert authorizations == [
            [f"Bearer {reader}"],
            [f"Bearer {writer}"],
            [f"Bearer {reader}"],
            ["Bearer not-a-token"],
        ]
    finally:
        running.stop()


def test_every_call_gets_the_default_deadline_unless_it_gives_its_own(server, clean_db):
    recorder = CallRecorder()
    with AdAccountsClient(
        server.target,
        timeout=4.0,
        interceptors=[recorder],
        metadata_provider=lambda: [("authorization", "Bearer t0ken")],
    ) as client:
        created = client.create(new_account())
        client.get(created.id, timeout=1.5, metadata=[("x-request-source", "test")])
    create_call, get_call = recorder.calls
    # What is left of it once connected (the first call waits for the connection).
    assert 3.9 <= create_call.timeout <= 4.0
    assert 1.49 <= get_call.timeout <= 1.5
    create_metadata, get_metadata = dict(create_call.metadata), dict(get_call.metadata)
    assert create_metadata.keys() == {"authorization", "x-request-id"}
    assert create_metadata["authorization"] == "Bearer t0ken"
    # The create answered with a consistency token, which the read sends back (docs/replicas.md).
    assert get_metadata.keys() == {"authorization", "x-request-source", "x-request-id", "x-consistency-token"}
    assert create_metadata["x-request-id"] != get_metadata["x-request-id"]  # one per call


def test_a_callers_channel_option_replaces_the_clients_own():
    """gRPC keeps the first value of a key given twice: the caller's must replace ours, not follow it."""
    options = channel_options(
        retry=None, keepalive_time_s=300, own_connection=False, extra=[("grpc.max_reconnect_backoff_ms", 10_000)]
    )
    keys = [key for key, _ in options]
    assert len(keys) == len(set(keys))
    assert dict(options)["grpc.max_reconnect_backoff_ms"] == 10_000


def test_keepalive_defaults_are_ones_a_default_server_accepts():
    """gRPC servers accept a ping per 5 minutes with calls in flight, and none on an idle connection
    (grpc.http2.min_ping_interval_without_data_ms, grpc.keepalive_permit_without_calls)."""
    for client_class in (AdAccountsClient, AsyncAdAccountsClient):
        default = inspect.signature(client_class).parameters["keepalive_time_s"].default
        options = dict(channel_options(retry=None, keepalive_time_s=default, own_connection=False, extra=()))
        assert options["grpc.keepalive_time_ms"] >= 300_000
        assert options["grpc.keepalive_permit_without_calls"] == 0


def test_version_follows_the_contract_and_dependencies_stay_thin():
    major = pb.DESCRIPTOR.package.rsplit(".v", 1)[1]
    assert adaccounts.__version__.split(".")[0] == major
    project = tomllib.loads((CLIENTS / "pyproject.toml").read_text())["project"]
    assert project["name"] == "adaccounts-client"
    assert sorted(dep.split(">")[0].split("=")[0] for dep in project["dependencies"]) == [
        "grpcio",
        "grpcio-status",
        "protobuf",
    ]


# --- load spreading and TLS, seen from a pass-through in front of the real server ---------------


@dataclass(frozen=True)
class SeenCall:
    method: str
    peer: str
    metadata: dict[str, str]
    client_common_name: bytes | None


class RecordingProxy(grpc.GenericRpcHandler):
    """A gRPC pass-through to the real server that records who called what.

    It stands where a pod would: the test's client connects to it, and the call (bytes
    in, bytes out, status and details back) goes on to the server and PostgreSQL.
    """

    def __init__(self, upstream: str, server_credentials: grpc.ServerCredentials | None = None) -> None:
        self.calls: list[SeenCall] = []
        self._upstream = grpc.insecure_channel(upstream)
        self._server = grpc.server(ThreadPoolExecutor(max_workers=4), handlers=[self])
        address = "127.0.0.1:0"
        if server_credentials is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, server_credentials)
        self._server.start()

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method

        def forward(request: bytes, context: grpc.ServicerContext) -> bytes:
            common_name = context.auth_context().get("x509_common_name")
            self.calls.append(
                SeenCall(
                    method,
                    context.peer(),
                    {key: value for key, value in context.invocation_metadata()},
                    common_name[0] if common_name else None,
                )
            )
            try:
                return self._upstream.unary_unary(method)(request, timeout=context.time_remaining())
            except grpc.RpcError as error:
                context.set_trailing_metadata(error.trailing_metadata())
                context.abort(error.code(), error.details())

        return grpc.unary_unary_rpc_method_handler(forward)

    def stop(self) -> None:
        self._server.stop(None)
        self._upstream.close()


@pytest.fixture
def proxies(server: RunningServer) -> Iterator[list[RecordingProxy]]:
    started = [RecordingProxy(server.target), RecordingProxy(server.target)]
    yield started
    for proxy in started:
        proxy.stop()


def test_round_robin_spreads_calls_over_every_address(proxies, clean_db):
    """What a dns:/// target to a headless Service resolves to: several addresses, one per pod."""
    target = "ipv4:" + ",".join(f"127.0.0.1:{proxy.port}" for proxy in proxies)
    with AdAccountsClient(target) as client:
        created = client.create(new_account())
        for _ in range(20):
            client.get(created.id)
    counts = [len(proxy.calls) for proxy in proxies]
    assert sum(counts) == 21
    assert min(counts) >= 5, counts


def test_connections_open_that_many_connections_to_one_address(proxies, clean_db):
    """One address in front of several processes: each connection may land on another one."""
    proxy = proxies[0]
    with AdAccountsClient(f"127.0.0.1:{proxy.port}", connections=3) as client:
        created = client.create(new_account())
        for _ in range(8):
            client.get(created.id)
    peers = [call.peer for call in proxy.calls]
    assert len(set(peers)) == 3  # three client ports: three TCP connections
    assert sorted(peers.count(peer) for peer in set(peers)) == [3, 3, 3]  # calls rotate over them


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, made with openssl."""
    folder = tmp_path_factory.mktemp("pki")
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca_extensions = ["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"]
    openssl("req", "-x509", *new_key, *ca_extensions, "-subj", "/CN=adaccounts test CA", "-days", "2",
            "-keyout", folder / "ca.key", "-out", folder / "ca.pem")  # fmt: skip
    for name, subject, extensions in [
        ("server", "/CN=localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        ("client", "/CN=billing-service", "extendedKeyUsage=clientAuth\n"),
    ]:
        (folder / f"{name}.ext").write_text(extensions)
        openssl("req", *new_key, "-subj", subject, "-keyout", folder / f"{name}.key", "-out", folder / f"{name}.csr")
        openssl("x509", "-req", "-in", folder / f"{name}.csr", "-days", "2", "-extfile", folder / f"{name}.ext",
                "-CA", folder / "ca.pem", "-CAkey", folder / "ca.key", "-out", folder / f"{name}.pem")  # fmt: skip
    return folder


@pytest.fixture
def tls_proxy(server: RunningServer, pki: Path) -> Iterator[RecordingProxy]:
    credentials = grpc.ssl_server_credentials(
        [((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())],
        root_certificates=(pki / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    proxy = RecordingProxy(server.target, credentials)
    yield proxy
    proxy.stop()


def test_mutual_tls_and_the_metadata_provider_reach_the_server(tls_proxy, pki, clean_db):
    tokens = iter(["token-1", "token-2"])
    credentials = tls_credentials(ca_file=pki / "ca.pem", cert_file=pki / "client.pem", key_file=pki / "client.key")
    with AdAccountsClient(
        f"127.0.0.1:{tls_proxy.port}",
        credentials=credentials,
        metadata_provider=lambda: [("authorization", f"Bearer {next(tokens)}")],
    ) as client:
        created = client.create(new_account())
        assert client.get(created.id) == created
    assert [call.metadata["authorization"] for call in tls_proxy.calls] == ["Bearer token-1", "Bearer token-2"]
    assert {call.client_common_name for call in tls_proxy.calls} == {b"billing-service"}


def test_tls_without_the_client_certificate_is_refused_naming_the_likely_cause(tls_proxy, pki):
    with (
        AdAccountsClient(
            f"127.0.0.1:{tls_proxy.port}", credentials=tls_credentials(ca_file=pki / "ca.pem"), connect_timeout=0.3
        ) as client,
        pytest.raises(ConnectionFailed) as caught,
    ):
        client.get(str(uuid.uuid4()))
    assert "client certificate" in caught.value.details, caught.value.details
    assert tls_proxy.calls == []


def test_plaintext_to_a_tls_server_is_refused_naming_the_likely_cause(tls_proxy):
    with (
        AdAccountsClient(f"127.0.0.1:{tls_proxy.port}", connect_timeout=0.3) as client,
        pytest.raises(ConnectionFailed) as caught,
    ):
        client.get(str(uuid.uuid4()))
    assert "Socket closed" in caught.value.details
    assert "does it want TLS" in caught.value.details


def test_tls_credentials_want_certificate_and_key_together(pki):
    with pytest.raises(ValueError, match="together"):
        tls_credentials(cert_file=pki / "client.pem")
