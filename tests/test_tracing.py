"""OpenTelemetry (TRACING=otlp): one trace holds the call's span and its SQL statements' spans."""

from __future__ import annotations

import grpc
import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from adaccounts_server import tracing
from conftest import RunningServer, new_account, test_settings
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C


@pytest.fixture
def spans(monkeypatch) -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    monkeypatch.setattr(tracing, "exporter_for", lambda settings: exporter)
    return exporter


def test_a_call_and_its_sql_are_one_trace(database_url, clean_db, spans):
    running = RunningServer(test_settings(database_url, TRACING="otlp"))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.AdAccountServiceStub(channel)
            created = stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account()), timeout=5)
            traceparent = f"00-{TRACE_ID:032x}-{0x1234567890ABCDEF:016x}-01"  # the caller's own trace
            stub.GetAdAccount(pb.GetAdAccountRequest(id=created.id), metadata=[("traceparent", traceparent)], timeout=5)
    finally:
        running.stop()  # flushes the spans
    finished = spans.get_finished_spans()
    (get,) = [s for s in finished if s.kind == SpanKind.SERVER and s.name.endswith("/GetAdAccount")]
    sql = [s for s in finished if s.context.trace_id == get.context.trace_id and s.kind == SpanKind.CLIENT]
    assert get.context.trace_id == TRACE_ID, "the caller's trace is continued"
    assert sql, [(s.name, s.kind) for s in finished]
    assert all(s.parent is not None and s.parent.span_id == get.context.span_id for s in sql)
    statements = " ".join(str(s.attributes.get("db.statement", "")) for s in sql)
    assert "SELECT" in statements and "ad_accounts" in statements
    everything = " ".join(f"{s.name} {dict(s.attributes or {})}" for s in finished)
    for value in (created.id, created.external_id, created.name):  # placeholders only, never values
        assert value not in everything


def test_tracing_is_off_by_default(server):
    assert server.app.tracing is None
