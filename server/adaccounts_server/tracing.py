"""OpenTelemetry tracing, off unless TRACING=otlp: one trace per call, its SQL statements inside it.

Uses opentelemetry-instrumentation-grpc's server interceptor (one span per
call, the caller's trace context continued from its metadata); `db` opens one
client span per round trip with the statement's SQL (placeholders, never
values). Every call's database work runs in the call's own task, so those spans
are children of the call's span, and tracing changes nothing about the path a
call takes.

Each App has its own TracerProvider, nothing global is patched, so servers
in one process (the tests) never share one. Spans go to the OTLP/gRPC
exporter, which reads the standard OTEL_EXPORTER_OTLP_* variables (endpoint,
headers, certificate); OTEL_SERVICE_NAME names the service (default
"adaccounts"). The packages are the optional `tracing` extra.

Records logged while a span is current (the call's log line, and anything
logged during the call) carry its trace id as `trace_id` (logs.enable_trace_ids),
so log lines and traces find each other.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from . import logs
from .config import Settings

log = logging.getLogger(__name__)


def exporter_for(settings: Settings) -> Any:
    """The span exporter for TRACING (tests replace this)."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


class Tracing:
    def __init__(self, settings: Settings) -> None:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME", "adaccounts")})
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(BatchSpanProcessor(exporter_for(settings)))
        self.interceptor = aio_server_interceptor(tracer_provider=self.provider)  # type: ignore[no-untyped-call]
        logs.enable_trace_ids()

    def sql_tracer(self) -> Any:
        """The tracer of the database's statement spans."""
        return self.provider.get_tracer("adaccounts_server.db")

    def stop(self) -> None:
        """Send the spans still buffered, then stop."""
        self.provider.shutdown()
