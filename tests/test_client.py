"""The client package (clients/adaccounts) against the real server and PostgreSQL:
every method, the page walker, the exception for each status, load spreading, TLS
and metadata. Retries across a restart: test_client_retry.py; asyncio:
test_client_aio.py; the install without the server's dependencies: test_client_install.py."""

from __future__ import annotations

import inspect
import itertools
import socket
import subprocess
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
    AdAccountsClient,
    AdAccountsError,
    AlreadyExists,
    AsyncAdAccountsClient,
    Conflict,
    DeadlineExceeded,
    FieldViolation,
    InvalidArgument,
    NotFound,
    RetryPolicy,
    Unavailable,
    tls_credentials,
)
from adaccounts._common import channel_options
from adaccounts.v1 import ad_accounts_pb2 as pb
from conftest import RunningServer, new_account
from google.rpc import status_pb2

CLIENTS = Path(__file__).resolve().parent.parent / "clients"
LIST_METHOD = "/adaccounts.v1.AdAccountService/ListAdAccounts"


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[AdAccountsClient]:
    with AdAccountsClient(server.target) as client:
        yield client


def closed_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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


def test_update_and_delete_with_a_stale_etag_raise_conflict(client, clean_db):
    created = client.create(new_account())
    client.update(pb.AdAccount(id=created.id, name="changed"), update_mask=["name"])
    stale = pb.AdAccount(id=created.id, name="mine", etag=created.etag)
    with pytest.raises(Conflict) as caught:
        client.update(stale, update_mask=["name"])
    assert caught.value.code == grpc.StatusCode.ABORTED
    with pytest.raises(Conflict):
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


def test_not_found_already_exists_and_conflict_keep_code_and_details(client, clean_db):
    missing = str(uuid.uuid4())
    with pytest.raises(NotFound) as not_found:
        client.get(missing)
    assert not_found.value.code == grpc.StatusCode.NOT_FOUND
    assert missing in not_found.value.details

    account = new_account()
    client.create(account)
    with pytest.raises(AlreadyExists) as exists:
        client.create(account)
    assert exists.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert account.external_id in exists.value.details

    for error_class in (NotFound, AlreadyExists, Conflict, Unavailable, InvalidArgument, DeadlineExceeded):
        assert issubclass(error_class, AdAccountsError)


def test_no_server_raises_unavailable_after_the_retries():
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.05, max_backoff_s=0.1)
    with AdAccountsClient(f"127.0.0.1:{closed_port()}", retry=policy) as client, pytest.raises(Unavailable) as caught:
        client.get(str(uuid.uuid4()))
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details
    assert caught.value.status is None  # no server, so no google.rpc.Status


def test_a_passed_deadline_raises_deadline_exceeded():
    """wait_for_ready waits for a server up to the deadline, then gives up."""
    client = AdAccountsClient(f"127.0.0.1:{closed_port()}", wait_for_ready=True, timeout=0.3)
    with client, pytest.raises(DeadlineExceeded) as caught:
        client.get(str(uuid.uuid4()))
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_other_statuses_raise_the_base_class(client, clean_db):
    """A request over gRPC's 4 MiB limit: RESOURCE_EXHAUSTED has no class of its own."""
    with pytest.raises(AdAccountsError) as caught:
        client.create(new_account(name="x" * (5 * 1024 * 1024)))
    assert type(caught.value) is AdAccountsError
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


# --- deadlines, metadata, options --------------------------------------------------------------


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
    assert create_call.timeout == pytest.approx(4.0)
    assert get_call.timeout == pytest.approx(1.5)
    assert list(create_call.metadata) == [("authorization", "Bearer t0ken")]
    assert list(get_call.metadata) == [("authorization", "Bearer t0ken"), ("x-request-source", "test")]


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


def test_tls_without_the_client_certificate_is_refused(tls_proxy, pki):
    with (
        AdAccountsClient(
            f"127.0.0.1:{tls_proxy.port}", credentials=tls_credentials(ca_file=pki / "ca.pem"), retry=None
        ) as client,
        pytest.raises(Unavailable),
    ):
        client.get(str(uuid.uuid4()))
    assert tls_proxy.calls == []


def test_tls_credentials_want_certificate_and_key_together(pki):
    with pytest.raises(ValueError, match="together"):
        tls_credentials(cert_file=pki / "client.pem")
