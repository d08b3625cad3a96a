"""OpenTelemetry (TRACING=otlp): one trace holds the call's span and its SQL statements' spans,
and the call's log lines carry its trace id."""

from __future__ import annotations

import io
import json
import uuid

import grpc
import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from adaccounts_server import logs, tracing
from helpers.databases import create_database, drop_database
from helpers.polling import wait_until
from helpers.rpc import new_account
from helpers.server import RunningServer
from helpers.settings import ADMIN_URL, server_settings
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
TRACEPARENT = f"00-{TRACE_ID:032x}-{0x1234567890ABCDEF:016x}-01"  # the caller's own trace
RPC_LOGGER = "adaccounts_server.rpc"
GET = "/adaccounts.v1.AdAccountService/GetAdAccount"


@pytest.fixture
def spans(monkeypatch) -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    monkeypatch.setattr(tracing, "exporter_for", lambda settings: exporter)
    return exporter


def test_a_call_and_its_sql_are_one_trace(database_url, clean_db, spans):
    running = RunningServer(server_settings(database_url, TRACING="otlp"))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.AdAccountServiceStub(channel)
            created = stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account()), timeout=5)
            stub.GetAdAccount(pb.GetAdAccountRequest(id=created.id), metadata=[("traceparent", TRACEPARENT)], timeout=5)
    finally:
        running.stop()  # flushes the spans
    finished = spans.get_finished_spans()
    (get,) = [s for s in finished if s.kind == SpanKind.SERVER and s.name.endswith("/GetAdAccount")]
    sql = [s for s in finished if s.context.trace_id == get.context.trace_id and s.kind == SpanKind.CLIENT]
    assert get.context.trace_id == TRACE_ID, "the caller's trace is continued"
    assert sql, [(s.name, s.kind) for s in finished]
    assert all(s.parent is not None and s.parent.span_id == get.context.span_id for s in sql)
    statements = " ".join(str(s.attributes.get("db.statement", "")) for s in sql)
    assert "SELECT" in statements
    assert "ad_accounts" in statements
    everything = " ".join(f"{s.name} {dict(s.attributes or {})}" for s in finished)
    for value in (created.id, created.external_id, created.name):  # placeholders only, never values
        assert value not in everything


def test_tracing_is_off_by_default(server):
    assert server.app.tracing is None


def logged(stream: io.StringIO, logger: str, count: int) -> list[dict]:
    """The lines of `logger`, once there are `count` (a call may be logged just after its caller has its answer)."""

    def found() -> list[dict]:
        return [line for line in map(json.loads, stream.getvalue().splitlines()) if line["logger"] == logger]

    wait_until(lambda: len(found()) >= count, 2, interval=0.01, message=f"{count} line(s) of {logger}")
    return found()


def test_a_calls_log_lines_carry_its_trace_id(database_url, clean_db, spans, json_log):
    running = RunningServer(server_settings(database_url, TRACING="otlp"))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.AdAccountServiceStub(channel)
            created = stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account()), timeout=5)
            stub.GetAdAccount(pb.GetAdAccountRequest(id=created.id), metadata=[("traceparent", TRACEPARENT)], timeout=5)
        create_line, get_line = logged(json_log, RPC_LOGGER, count=2)
    finally:
        running.stop()  # flushes the spans
    server_spans = {s.name.rsplit("/", 1)[-1]: s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER}
    # The caller's trace, continued: its id in the line, as trace backends show it (32 hex digits).
    assert get_line["trace_id"] == f"{TRACE_ID:032x}" == format(server_spans["GetAdAccount"].context.trace_id, "032x")
    # No traceparent: the server's own trace for the call, the one its span is in.
    assert create_line["trace_id"] == format(server_spans["CreateAdAccount"].context.trace_id, "032x")
    assert len(create_line["trace_id"]) == 32
    assert create_line["trace_id"] != get_line["trace_id"]
    # Lines logged outside any call (start-up, health, shutdown) have none.
    others = [line for line in map(json.loads, json_log.getvalue().splitlines()) if line["logger"] != RPC_LOGGER]
    assert others
    assert not any("trace_id" in line for line in others)


def test_every_line_logged_during_a_call_carries_its_trace_id(spans, json_log):
    # No schema: the call fails INTERNAL, and adaccounts_server.errors logs the traceback during it.
    name = f"adaccounts_test_noschema_{uuid.uuid4().hex[:8]}"
    url = create_database(ADMIN_URL, name)
    running = RunningServer(server_settings(url, TRACING="otlp"))
    try:
        with grpc.insecure_channel(running.target) as channel, pytest.raises(grpc.RpcError) as raised:
            pb_grpc.AdAccountServiceStub(channel).GetAdAccount(
                pb.GetAdAccountRequest(id=str(uuid.uuid4())), metadata=[("traceparent", TRACEPARENT)], timeout=5
            )
        (rpc_line,) = logged(json_log, RPC_LOGGER, count=1)
    finally:
        running.stop()
        drop_database(ADMIN_URL, name)
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    (detail,) = logged(json_log, "adaccounts_server.errors", count=1)
    assert detail["error_id"] == rpc_line["error_id"]
    assert detail["trace_id"] == rpc_line["trace_id"] == f"{TRACE_ID:032x}"


def test_no_trace_id_when_tracing_is_off(database_url, clean_db, json_log, monkeypatch):
    monkeypatch.setattr(logs, "_current_trace_id", logs._current_trace_id)  # restored afterwards
    logs.enable_trace_ids()  # as once any server in the process has traced
    running = RunningServer(server_settings(database_url))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.AdAccountServiceStub(channel)
            stub.ListAdAccounts(pb.ListAdAccountsRequest(), metadata=[("traceparent", TRACEPARENT)], timeout=5)
        (line,) = logged(json_log, RPC_LOGGER, count=1)
    finally:
        running.stop()
    assert running.app.tracing is None
    assert "trace_id" not in line
    assert not any("trace_id" in json.loads(text) for text in json_log.getvalue().splitlines())
