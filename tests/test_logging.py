"""Structured logs: one line per call with method, code, duration, peer, caller and request id;
the request id goes back to the caller; an INTERNAL error's id is the one in the log."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from adaccounts_server import logs
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.databases import create_database, drop_database
from helpers.pki import CertificateAuthority
from helpers.polling import wait_until
from helpers.ports import free_port
from helpers.rpc import new_account
from helpers.server import RunningServer
from helpers.settings import ADMIN_URL, server_settings

RPC_LOGGER = "adaccounts_server.rpc"
GET = "/adaccounts.v1.AdAccountService/GetAdAccount"


def json_lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def rpc_lines(stream: io.StringIO, method: str | None = None, count: int = 0) -> list[dict]:
    """The per-call lines, once there are at least `count`: a call may be logged just after its
    caller has its answer."""

    def found() -> list[dict]:
        return [
            line
            for line in json_lines(stream)
            if line["logger"] == RPC_LOGGER and (method is None or line["method"] == method)
        ]

    if count:
        wait_until(lambda: len(found()) >= count, 2, interval=0.01, message=f"{count} per-call log line(s)")
    return found()


def call(stub_method, request, metadata=()) -> tuple[grpc.StatusCode, dict[str, str], str]:
    """(code, trailing metadata, details) of one call."""
    try:
        _, outcome = stub_method.with_call(request, metadata=metadata, timeout=5)
        return grpc.StatusCode.OK, dict(outcome.trailing_metadata()), ""
    except grpc.RpcError as error:
        return error.code(), dict(error.trailing_metadata() or ()), error.details()


def test_one_json_line_per_call_with_every_field(stub, server, json_log):
    created = stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account()), timeout=5)
    code, trailing, _ = call(stub.GetAdAccount, pb.GetAdAccountRequest(id=created.id), [("x-request-id", "req-42")])
    assert code == grpc.StatusCode.OK
    assert trailing["x-request-id"] == "req-42"
    missing = str(uuid.uuid4())
    code, trailing, _ = call(stub.GetAdAccount, pb.GetAdAccountRequest(id=missing))
    assert code == grpc.StatusCode.NOT_FOUND
    generated = trailing["x-request-id"]
    assert len(generated) == 32
    assert int(generated, 16) >= 0

    lines = rpc_lines(json_log, GET, count=2)
    assert len(lines) == 2, lines
    found, not_found = lines
    assert found["code"] == "OK"
    assert not_found["code"] == "NOT_FOUND"
    assert (found["request_id"], not_found["request_id"]) == ("req-42", generated)
    for line in lines:
        assert line["level"] == "INFO"
        assert line["caller"] == "-"
        assert line["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:"))
        assert isinstance(line["duration_ms"], float)
        assert 0 < line["duration_ms"] < 5000
        assert line["time"].endswith("Z")
    assert len(rpc_lines(json_log, "/adaccounts.v1.AdAccountService/CreateAdAccount", count=1)) == 1


@pytest.mark.parametrize("sent", ["has space", 'quote"s', "x" * 129, ""])
def test_an_unusable_request_id_is_replaced(stub, json_log, sent):
    _, trailing, _ = call(stub.ListAdAccounts, pb.ListAdAccountsRequest(), [("x-request-id", sent)])
    assert trailing["x-request-id"] != sent
    assert len(trailing["x-request-id"]) == 32
    assert sent not in json_log.getvalue() or not sent


def test_error_statuses_keep_their_details_and_carry_the_request_id(stub, json_log):
    code, trailing, _ = call(stub.GetAdAccount, pb.GetAdAccountRequest(id="nope"), [("x-request-id", "bad-id-1")])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert trailing["x-request-id"] == "bad-id-1"
    assert "grpc-status-details-bin" in trailing  # the field violations are still there
    assert rpc_lines(json_log, GET, count=1)[-1]["code"] == "INVALID_ARGUMENT"


def test_health_checks_are_not_logged_at_info(server, json_log):
    with grpc.insecure_channel(server.target) as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5)
    assert rpc_lines(json_log) == []


def test_internal_error_id_is_the_one_in_the_log(json_log):
    name = f"adaccounts_test_noschema_{uuid.uuid4().hex[:8]}"
    url = create_database(ADMIN_URL, name)
    running = RunningServer(server_settings(url))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.AdAccountServiceStub(channel)
            code, trailing, details = call(
                stub.GetAdAccount, pb.GetAdAccountRequest(id=str(uuid.uuid4())), [("x-request-id", "oops-1")]
            )
    finally:
        running.stop()
        drop_database(ADMIN_URL, name)
    assert code == grpc.StatusCode.INTERNAL
    error_id = details.split("error id ")[1].rstrip(")")
    (line,) = rpc_lines(json_log, GET, count=1)
    assert (line["code"], line["level"]) == ("INTERNAL", "ERROR")
    assert (line["error_id"], line["request_id"]) == (error_id, "oops-1")
    (detail,) = [x for x in json_lines(json_log) if x["logger"] == "adaccounts_server.errors"]
    assert detail["error_id"] == error_id
    assert detail["request_id"] == "oops-1"
    assert "Traceback" in detail["exception"]  # the detail is in the log, not in the caller's status
    assert trailing["x-request-id"] == "oops-1"


def test_caller_is_the_tokens_service_name(database_url, clean_db, json_log):
    token = "a-token-for-billing-0123456789"
    tokens = {hashlib.sha256(token.encode()).hexdigest(): {"name": "billing", "scope": "read"}}
    running = RunningServer(server_settings(database_url, AUTH_TOKENS=json.dumps(tokens)))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.AdAccountServiceStub(channel)
            call(stub.ListAdAccounts, pb.ListAdAccountsRequest(), [("authorization", f"Bearer {token}")])
            call(stub.ListAdAccounts, pb.ListAdAccountsRequest(), [("authorization", "Bearer wrong")])
            call(stub.CreateAdAccount, pb.CreateAdAccountRequest(), [("authorization", f"Bearer {token}")])
    finally:
        running.stop()
    lines = rpc_lines(json_log, count=3)
    assert [(line["caller"], line["code"]) for line in lines] == [
        ("billing", "OK"),
        ("-", "UNAUTHENTICATED"),
        ("billing", "PERMISSION_DENIED"),
    ]
    assert token not in json_log.getvalue()
    assert "wrong" not in json_log.getvalue()


def test_caller_is_the_client_certificates_name_under_mtls(database_url, tmp_path, json_log):
    ca = CertificateAuthority(tmp_path, "logs")
    server_cert, client_cert = ca.issue("localhost", server=True), ca.issue("reporting", server=False)
    settings = server_settings(
        database_url,
        GRPC_TLS="mtls",
        GRPC_TLS_CERT_FILE=server_cert.cert,
        GRPC_TLS_KEY_FILE=server_cert.key,
        GRPC_TLS_CLIENT_CA_FILE=ca.cert,
    )
    running = RunningServer(settings)
    try:
        key, chain = client_cert.pair()
        credentials = grpc.ssl_channel_credentials(ca.cert.read_bytes(), private_key=key, certificate_chain=chain)
        with grpc.secure_channel(running.target, credentials) as channel:
            call(pb_grpc.AdAccountServiceStub(channel).ListAdAccounts, pb.ListAdAccountsRequest())
    finally:
        running.stop()
    (line,) = rpc_lines(json_log, count=1)
    assert line["caller"] == "cn=reporting"


def test_serve_writes_json_lines_when_stderr_is_not_a_terminal(tmp_path: Path):
    """The real program, zero setup (SQLite), its stderr in a file."""
    adaccounts = shutil.which("adaccounts")
    assert adaccounts, "pip install --no-deps -e ./clients -e ."
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRPC_", "LOG_", "DATABASE_", "POSTGRES_"))}
    stderr = tmp_path / "serve.err"
    with stderr.open("wb") as err:
        process = subprocess.Popen(
            [adaccounts, "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = pb_grpc.AdAccountServiceStub(channel)
            call(stub.GetAdAccount, pb.GetAdAccountRequest(id=str(uuid.uuid4())), [("x-request-id", "cli-1")])
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    lines = [json.loads(line) for line in stderr.read_text().splitlines()]  # every line is JSON
    assert any("plaintext (GRPC_TLS=off)" in line["message"] for line in lines)
    (rpc,) = [line for line in lines if line["logger"] == RPC_LOGGER]
    assert {"method", "code", "duration_ms", "peer", "caller", "request_id"} <= rpc.keys()
    assert (rpc["method"], rpc["code"], rpc["request_id"]) == (GET, "NOT_FOUND", "cli-1")
    assert time.strptime(rpc["time"][:19], "%Y-%m-%dT%H:%M:%S")


class _StalledStream(io.StringIO):
    """stderr whose reader has stopped: write() blocks until released."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.release.wait(30)
        return super().write(text)


def test_a_stalled_log_reader_costs_bounded_memory_and_never_blocks_a_caller():
    # Issue 12, row 8: with stderr's reader stalled, every call's line queued up without bound.
    stream = _StalledStream()
    handoff = logs._Handoff(stream, logs.JsonFormatter())
    logger = logging.getLogger("adaccounts_server.test_stalled_log")
    logger.addHandler(handoff)
    logger.propagate = False
    dropped_before = logs.dropped_lines()
    try:
        started = time.monotonic()
        for i in range(logs.QUEUE_MAX * 3):
            logger.warning("call %d", i)
        took = time.monotonic() - started
        # Held at most: the queue, and the one batch the writer is stuck writing.
        assert handoff._queue.qsize() <= logs.QUEUE_MAX + 1
        dropped = logs.dropped_lines() - dropped_before
        assert dropped >= logs.QUEUE_MAX * 3 - logs.QUEUE_MAX - logs._BATCH_MAX - 1
        assert took < 10, f"logging {logs.QUEUE_MAX * 3} lines took {took:.1f} s: it waited on the stalled stream"
    finally:
        stream.release.set()
        handoff.close()
        logger.removeHandler(handoff)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    warnings = [line for line in lines if "log lines were dropped" in line["message"]]
    assert len(warnings) == 1, warnings
    assert warnings[0]["level"] == "WARNING", warnings
    assert warnings[0]["message"].startswith(f"{dropped} log lines were dropped")
