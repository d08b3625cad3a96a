"""OpenTelemetry tracing, off unless TRACING=otlp: one trace per call, its SQL statements inside it.

Uses the official instrumentations: opentelemetry-instrumentation-grpc's
server interceptor (one span per call, the caller's trace context continued
from its metadata) and opentelemetry-instrumentation-sqlalchemy's engine
tracer (one span per statement). The service runs each call's database work
in a copy of the call's context, so the statements' spans are children of the
call's span even though they run on a worker thread.

Each App has its own TracerProvider, nothing global is patched, so servers
in one process (the tests) never share one. Spans go to the OTLP/gRPC
exporter, which reads the standard OTEL_EXPORTER_OTLP_* variables (endpoint,
headers, certificate); OTEL_SERVICE_NAME names the service (default
"adaccounts"). The packages are the optional `tracing` extra.
"""

from __future__ import annotations

import logging
import os
from typing import Any

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
        self.interceptor = aio_server_interceptor(tracer_provider=self.provider)
        self._engine_tracer: Any = None

    def trace_engine(self, engine: Any) -> None:
        """One span per SQL statement on this engine (what SQLAlchemyInstrumentor(engine=...) sets up,
        without its global patch of create_engine)."""
        from opentelemetry.instrumentation.sqlalchemy import __version__
        from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
        from opentelemetry.metrics import NoOpMeterProvider

        tracer = self.provider.get_tracer("opentelemetry.instrumentation.sqlalchemy", __version__)
        usage = NoOpMeterProvider().get_meter(__name__).create_up_down_counter("db.client.connections.usage")
        self._engine_tracer = EngineTracer(tracer, engine, usage)

    def stop(self) -> None:
        """Send the spans still buffered, then stop."""
        if self._engine_tracer is not None:
            self._engine_tracer.remove_all_event_listeners()
        self.provider.shutdown()


def check_installed() -> str | None:
    """None when the tracing packages are importable; else what to install."""
    try:
        import opentelemetry.exporter.otlp.proto.grpc.trace_exporter
        import opentelemetry.instrumentation.grpc
        import opentelemetry.instrumentation.sqlalchemy
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        return "the OpenTelemetry packages are not installed: pip install 'adaccounts-server[tracing]'"
    return None
