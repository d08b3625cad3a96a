"""Log output: one JSON object per line when stderr is not a terminal, readable text when it is.

Every record logged while a call is handled carries that call's request id
(`request_id`, from the call's `x-request-id` metadata or made up), so the
line an INTERNAL error leaves in the log can be found from the id the caller
quotes, and from the request id the caller sent. With tracing on (TRACING=otlp)
every record logged while a span is current (the call's, or one of its SQL
statements') also carries its trace id (`trace_id`, 32 hex digits, as the
trace backends show it), so a call's log lines and its trace find each other.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, TextIO

# The request id of the call being handled, on the event loop (set by guard.CallGuard).
request_id: ContextVar[str | None] = ContextVar("adaccounts_request_id", default=None)

# Where grpc.aio logs what happens to calls on the server.
GRPC_AIO_LOGGER = "grpc._cython.cygrpc"

# Attributes a record may carry (logging's `extra=`) that become fields of the JSON line.
FIELDS = ("rpc", "error_id")


class _DropEndedCalls(logging.Filter):
    """grpc.aio logs a traceback at ERROR for every call it cancels (the caller went away,
    or the shutdown grace ran out), and for an answer it could not send because the call had
    ended meanwhile (its deadline passed as the handler returned: "ExecuteBatchError raised
    in core by servicer method"). None is a server error: the call's own log line says
    CANCELLED or DEADLINE_EXCEEDED, and shutdown says how many calls it cut short."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is asyncio.CancelledError:
            return False
        return not str(record.msg).startswith("ExecuteBatchError raised in core by servicer method")


def quiet_grpc_core() -> None:
    """Drop grpc.aio's log records about calls that had ended (idempotent; every server does it)."""
    grpc_aio = logging.getLogger(GRPC_AIO_LOGGER)
    if not any(isinstance(f, _DropEndedCalls) for f in grpc_aio.filters):
        grpc_aio.addFilter(_DropEndedCalls())


def _no_trace_id() -> str | None:
    return None


# The current span's trace id, read on the thread that logs; None while tracing is off
# (enable_trace_ids() swaps it in once an App traces).
_current_trace_id: Callable[[], str | None] = _no_trace_id


def enable_trace_ids() -> None:
    """Give every record logged while an OpenTelemetry span is current that span's trace id.

    Called by tracing.Tracing: nothing is read (nor OpenTelemetry imported) for logging
    until a server traces. Process-wide, but a server that does not trace starts no span,
    so its lines have no trace id either."""
    global _current_trace_id
    from opentelemetry import trace

    def current_trace_id() -> str | None:
        context = trace.get_current_span().get_span_context()
        return format(context.trace_id, "032x") if context.is_valid else None

    _current_trace_id = current_trace_id


class _RequestIdFilter(logging.Filter):
    """The call's request id and trace id, read where the record is logged (context variables)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        if not hasattr(record, "trace_id"):
            record.trace_id = _current_trace_id()
        return True


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message", "request_id"?, "trace_id"?, <rpc fields>?, "error_id"?,
    "exception"?}`."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            line["request_id"] = request_id
        trace_id = getattr(record, "trace_id", None)
        if trace_id:
            line["trace_id"] = trace_id
        rpc = getattr(record, "rpc", None)
        if isinstance(rpc, dict):
            line.update(rpc)
        error_id = getattr(record, "error_id", None)
        if error_id:
            line["error_id"] = error_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:  # formatted already, by _Handoff on the thread that logged it
            line["exception"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = []
        rid = getattr(record, "request_id", None)
        if rid and not isinstance(getattr(record, "rpc", None), dict):  # rpc lines say it themselves
            extra.append(f"request_id={rid}")
        trace_id = getattr(record, "trace_id", None)
        if trace_id:
            extra.append(f"trace_id={trace_id}")
        return f"{text} [{' '.join(extra)}]" if extra else text


def wants_json(log_format: str, stream: TextIO) -> bool:
    if log_format == "auto":
        try:
            return not stream.isatty()
        except (AttributeError, ValueError):
            return True
    return log_format == "json"


def _formatter(log_format: str, stream: TextIO) -> logging.Formatter:
    return JsonFormatter() if wants_json(log_format, stream) else TextFormatter()


def handler(stream: TextIO, log_format: str = "auto") -> logging.Handler:
    """A handler writing to `stream` as JSON lines or text, with each record's request id."""
    out = logging.StreamHandler(stream)
    out.setFormatter(_formatter(log_format, stream))
    out.addFilter(_RequestIdFilter())
    return out


class _Handoff(logging.Handler):
    """Hands each record to a writer thread, which formats what has queued up and
    writes it with one write() per batch.

    Formatting and writing each line on the event loop, or waking a writer for each
    line, cost a point read much of its throughput (docs/decisions/0002): every GIL
    hand-over makes the loop wait behind another thread, so the writer wakes at most
    every _GATHER_S.
    The request id is read here, on the thread that logged (it lives in a context
    variable); the message and any traceback become text here too, so the record no
    longer holds arguments that may change or frames that keep objects alive.
    close() (logging.shutdown(), at exit) writes what is still queued.

    The queue is bounded (QUEUE_MAX records, besides the batch being written): when stderr is not read (a stalled log
    shipper, a full pipe), records past it are dropped and counted rather than kept, so
    memory stays flat and no call ever waits on logging; once the writer catches up it
    says how many it dropped, in one WARNING line.
    """

    _STOP = None

    def __init__(self, stream: TextIO, formatter: logging.Formatter) -> None:
        super().__init__()
        self.addFilter(_RequestIdFilter())
        self._stream = stream
        self._formatter = formatter
        self._queue: queue.SimpleQueue[logging.LogRecord | None] = queue.SimpleQueue()
        self._dropped_reported = _dropped
        self._writer = threading.Thread(target=self._write_batches, name="log-writer", daemon=True)
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        if self._queue.qsize() >= QUEUE_MAX:
            global _dropped
            _dropped += 1  # only ever written here and read elsewhere: a lost update is one line miscounted
            return
        try:
            record.msg = record.getMessage()
            record.args = None
            if record.exc_info:
                record.exc_text = _TRACEBACKS.formatException(record.exc_info)
                record.exc_info = None
            self._queue.put(record)
        except Exception:
            self.handleError(record)

    def _write_batches(self) -> None:
        while True:
            batch = [self._queue.get()]
            # Let a batch gather: waking up for every line would make this thread compete
            # for the GIL as often as calls arrive.
            time.sleep(_GATHER_S)
            while not self._queue.empty() and len(batch) < _BATCH_MAX:
                batch.append(self._queue.get())
            stop = self._STOP in batch
            lines = []
            for record in batch:
                if record is self._STOP:
                    continue
                try:
                    lines.append(self._formatter.format(record) + "\n")
                except Exception:
                    self.handleError(record)  # one bad record must not stop the writer
            if _dropped > self._dropped_reported and self._queue.empty():
                lines.append(self._formatter.format(self._drops_line()) + "\n")
            try:
                self._stream.write("".join(lines))
                self._stream.flush()
            except (OSError, ValueError):  # the stream is gone (closed, broken pipe): nothing to do
                pass
            if stop:
                return

    def _drops_line(self) -> logging.LogRecord:
        """The WARNING that says how many lines were dropped since the last one said so."""
        dropped, self._dropped_reported = _dropped - self._dropped_reported, _dropped
        return logging.LogRecord(
            __name__,
            logging.WARNING,
            __file__,
            0,
            f"{dropped} log lines were dropped: the log output was not being read fast enough",
            None,
            None,
        )

    def close(self) -> None:
        if self._writer.is_alive():
            self._queue.put(self._STOP)
            self._writer.join(_CLOSE_WAIT_S)
        super().close()


_TRACEBACKS = logging.Formatter()
# Records waiting for the writer, at most (~1-2 KB each).
QUEUE_MAX = 10_000
_dropped = 0  # records dropped because the queue was full, since the process started
_BATCH_MAX = 10_000
_GATHER_S = 0.05
_CLOSE_WAIT_S = 5.0


def dropped_lines() -> int:
    """Log records dropped so far because the log output was not being read."""
    return _dropped


def configure(level: str, log_format: str = "auto", stream: TextIO | None = None) -> None:
    """Send every log record to stderr (or `stream`), as JSON lines or text (LOG_FORMAT auto|json|text),
    written by a thread of its own."""
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    out = stream or sys.stderr
    root.addHandler(_Handoff(out, _formatter(log_format, out)))
    root.setLevel(level.upper())
    quiet_grpc_core()


def first_line(error: object) -> str:
    """The gist of a driver error for a log line: its first line, or its type."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
