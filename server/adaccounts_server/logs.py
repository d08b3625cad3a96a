"""Log output: one JSON object per line when stderr is not a terminal, readable text when it is.

Every record logged while a call is handled carries that call's request id
(`request_id`, from the call's `x-request-id` metadata or made up), so the
line an INTERNAL error leaves in the log can be found from the id the caller
quotes, and from the request id the caller sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any, TextIO

# The request id of the call being handled, on the event loop (set by the interceptor).
request_id: ContextVar[str | None] = ContextVar("adaccounts_request_id", default=None)

# Where grpc.aio logs what happens to calls on the server.
GRPC_AIO_LOGGER = "grpc._cython.cygrpc"

# Attributes a record may carry (logging's `extra=`) that become fields of the JSON line.
FIELDS = ("rpc", "error_id")


class _DropCancelledCalls(logging.Filter):
    """grpc.aio logs a traceback at ERROR for every call it cancels (the caller went away,
    or the shutdown grace ran out). Neither is a server error: the call's own log line
    says CANCELLED, and shutdown says how many calls it cut short."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.exc_info[0] is asyncio.CancelledError)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message", "request_id"?, <rpc fields>?, "error_id"?, "exception"?}`."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "request_id", None):
            line["request_id"] = record.request_id
        rpc = getattr(record, "rpc", None)
        if isinstance(rpc, dict):
            line.update(rpc)
        if getattr(record, "error_id", None):
            line["error_id"] = record.error_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        rid = getattr(record, "request_id", None)
        if rid and not isinstance(getattr(record, "rpc", None), dict):  # rpc lines say it themselves
            text = f"{text} [request_id={rid}]"
        return text


def wants_json(log_format: str, stream: TextIO) -> bool:
    if log_format == "auto":
        try:
            return not stream.isatty()
        except (AttributeError, ValueError):
            return True
    return log_format == "json"


def handler(stream: TextIO, log_format: str = "auto") -> logging.Handler:
    """A handler writing to `stream` as JSON lines or text, with each record's request id."""
    out = logging.StreamHandler(stream)
    out.setFormatter(JsonFormatter() if wants_json(log_format, stream) else TextFormatter())
    out.addFilter(_RequestIdFilter())
    return out


def configure(level: str, log_format: str = "auto", stream: TextIO | None = None) -> None:
    """Send every log record to stderr (or `stream`), as JSON lines or text (LOG_FORMAT auto|json|text)."""
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler(stream or sys.stderr, log_format))
    root.setLevel(level.upper())
    grpc_aio = logging.getLogger(GRPC_AIO_LOGGER)
    if not any(isinstance(f, _DropCancelledCalls) for f in grpc_aio.filters):
        grpc_aio.addFilter(_DropCancelledCalls())
