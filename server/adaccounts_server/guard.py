"""The call guard: what every AdAccountService call goes through around its handler.

Who is calling, and may they; whether the server takes the call at all (admission);
which calls are in progress (for a graceful stop); and, once it ends, its log line
and metrics. The servicer behind it only translates calls.

Callers authenticate with a bearer token (`authorization: Bearer <token>`
metadata) when AUTH_TOKENS is set. The server keeps only SHA-256 hashes of the
tokens, each with the calling service's name and scope (`read` or
`read-write`): a missing or unknown token is UNAUTHENTICATED, a `read` caller
asking for a write is PERMISSION_DENIED. Tokens are compared in constant time
(every hash is compared, with hmac.compare_digest) and never logged. Health and
reflection stay open, so probes and grpcurl need no token.

Every AdAccountService call is also logged, once, when it ends: method, status code,
duration, peer, caller and request id (the caller's `x-request-id` metadata
when it sends a usable one, else a new one; returned in the trailing
metadata either way). Calls that fail on the server's side (INTERNAL,
UNAVAILABLE, ...) are logged at WARNING or ERROR, the rest at INFO, so
LOG_LEVEL=WARNING keeps only the failures. Health checks are not logged: probes
would drown the rest (the health status has its own log line and metric).

Admission: past MAX_CONCURRENT_RPCS calls not yet ended (in progress, or answered
with a response not yet written to a caller that stops reading), a call is shed at
once with RESOURCE_EXHAUSTED, since queueing would only make every caller late.
While the server drains (shutdown) new calls get UNAVAILABLE; once the grace is
over, the calls still in progress are cut short with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from . import errors, logs
from .config import TokenGrant
from .metrics import Metrics
from .service import SERVICE_NAME

rpc_log = logging.getLogger("adaccounts_server.rpc")

WRITES = ("CreateAdAccount", "UpdateAdAccount", "DeleteAdAccount")
WRITE_METHODS = frozenset(f"/{SERVICE_NAME}/{name}" for name in WRITES)
ANONYMOUS = "-"
REQUEST_ID = "x-request-id"
# A request id from the caller is logged and sent back only if it is this tame.
_USABLE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
# Codes that say the server (or what it depends on) failed, not the caller.
SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


@dataclass(frozen=True)
class Caller:
    name: str
    scope: str  # "read" | "read-write"


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, caller: Caller | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.caller = caller  # known when the token was good but not good enough


class Authenticator:
    """Bearer tokens → the calling service, from the hashes in AUTH_TOKENS (None: no authentication)."""

    def __init__(self, grants: Mapping[str, TokenGrant] | None) -> None:
        self.enabled = grants is not None
        self._grants = [(bytes.fromhex(digest), grant) for digest, grant in (grants or {}).items()]

    def authenticate(self, metadata: Iterable[tuple[str, Any]] | None, method: str) -> Caller | None:
        """The caller allowed to call `method`; None when authentication is off. Raises Refused."""
        if not self.enabled:
            return None
        token = _bearer_token(metadata)
        if token is None:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "a bearer token is required (authorization metadata)")
        digest = hashlib.sha256(token.encode()).digest()
        found: TokenGrant | None = None
        for known, grant in self._grants:  # every one, so the time taken says nothing about which matched
            if hmac.compare_digest(digest, known):
                found = grant
        if found is None:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not valid")
        if method in WRITE_METHODS and found.scope != "read-write":
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"caller {found.name!r} may only read; {method.rsplit('/', 1)[-1]} needs scope read-write",
                Caller(found.name, found.scope),
            )
        return Caller(found.name, found.scope)


def _bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    values = [value for key, value in metadata or () if key == "authorization"]
    if len(values) > 1:
        # Which one would count is anybody's guess (a client's default token beside a
        # narrower one for this call): refuse rather than pick.
        raise Refused(grpc.StatusCode.UNAUTHENTICATED, "send one authorization value, not several")
    if not values or isinstance(values[0], bytes):
        return None
    scheme, _, token = values[0].strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class CallGuard:
    """Authenticates and authorises, admits or sheds, tracks, logs and counts every
    AdAccountService call.

    Applied once per method when the handlers are registered (see wrap), not as a
    grpc.aio ServerInterceptor: an interceptor runs a coroutine and builds a new
    handler for every call, which cost ~200 us of the event loop's time per call,
    a quarter of a point read. Health and reflection are not wrapped: they stay
    open to probes and grpcurl, and unlogged (probes would drown the rest).
    """

    def __init__(
        self,
        authenticator: Authenticator,
        metrics: Metrics | None = None,
        *,
        max_concurrent_rpcs: int,
        client_certificates: bool = False,
    ) -> None:
        self._authenticator = authenticator
        self._metrics = metrics
        # Only mutual TLS has a client certificate to name an anonymous caller by; asking
        # gRPC for the auth context of every call otherwise costs for nothing.
        self._client_certificates = client_certificates
        self._max_unfinished = max_concurrent_rpcs
        self._draining = False
        self._cutting_short = False
        self._calls: set[asyncio.Task[Any]] = set()  # the calls in progress: their handlers' tasks
        # Calls admitted and not yet ended: in progress, or answered with a response not yet
        # written to the caller (one that stops reading would otherwise pin them in memory).
        self._unfinished = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def wrap(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        """The unary `handler` of `method` (`/pkg.Service/Method`), guarded."""
        behaviour = handler.unary_unary
        assert behaviour is not None, "AdAccountService's methods are all unary"

        async def admitted(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await self._admitted(behaviour, request, context)

        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            metadata = context.invocation_metadata()
            run: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
            try:
                caller = self._authenticator.authenticate(metadata, method)
                run = admitted
            except Refused as refused:
                caller, run = refused.caller, _refusal(refused)
            return await self._observe(run, method, caller, _request_id(metadata), request, context)

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _observe(
        self,
        behaviour: Callable[..., Awaitable[Any]],
        method: str,
        caller: Caller | None,
        rid: str,
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> Any:
        """Run the handler with the request id in place, then log how the call ended."""
        started = time.perf_counter()
        logs.request_id.set(rid)  # this call's own context: seen by its handler's log lines
        context.set_trailing_metadata(((REQUEST_ID, rid),))
        if self._metrics is not None:
            self._metrics.call_started(method)
        code = grpc.StatusCode.OK
        try:
            response = await behaviour(request, context)
            code = context.code() or grpc.StatusCode.OK
            return response
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                code = grpc.StatusCode.DEADLINE_EXCEEDED
            raise
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except Exception:
            code = grpc.StatusCode.UNKNOWN
            raise
        finally:
            seconds = time.perf_counter() - started
            if self._metrics is not None:
                self._metrics.call_ended(method, code, seconds)
            _log(method, caller, rid, context, code, seconds, self._client_certificates)

    # --- admission and the calls in progress ---------------------------------------------------

    async def _admitted(
        self, behaviour: Callable[..., Awaitable[Any]], request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        """The handler, if the server takes the call: tracked until it ends."""
        if self._draining:
            await errors.answer(context, grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry")
        if self._unfinished >= self._max_unfinished:
            await errors.answer(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server is overloaded ({self._unfinished} calls in progress); retry with backoff",
            )
        self._unfinished += 1
        context.add_done_callback(self._ended)  # type: ignore[arg-type]  # grpc-stubs: a class, not a callable
        task = asyncio.current_task()
        assert task is not None  # a handler always runs in a task of its own
        self._calls.add(task)
        self._idle.clear()
        try:
            return await behaviour(request, context)
        except asyncio.CancelledError:
            if self._cutting_short:
                # Answered here, so that gRPC has no call left to cancel as it stops
                # (it prints a bare CancelledError traceback for each one it does).
                await errors.answer(context, grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry")
            raise
        finally:
            self._calls.discard(task)
            if not self._calls:
                self._idle.set()

    def _ended(self, _context: Any) -> None:
        """gRPC's callback when a call has ended: its status sent (after its response), or the call gone."""
        self._unfinished -= 1

    @property
    def unfinished(self) -> int:
        """Calls admitted and not yet ended, responses not yet written included."""
        return self._unfinished

    @property
    def in_flight(self) -> int:
        """Calls whose handler is running."""
        return len(self._calls)

    def start_draining(self) -> None:
        """From now on new calls get UNAVAILABLE; calls already in progress carry on."""
        self._draining = True

    def cut_short(self) -> None:
        """End every call still in progress with UNAVAILABLE (the shutdown grace is over)."""
        self._cutting_short = True
        for task in self._calls:
            task.cancel()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is in progress; False if some still are after `timeout` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


def _log(
    method: str,
    caller: Caller | None,
    rid: str,
    context: grpc.aio.ServicerContext[Any, Any],
    code: grpc.StatusCode,
    seconds: float,
    client_certificates: bool,
) -> None:
    if code == grpc.StatusCode.INTERNAL or code == grpc.StatusCode.UNKNOWN:
        level = logging.ERROR
    elif code in SERVER_FAULTS:
        level = logging.WARNING
    else:
        level = logging.INFO
    if not rpc_log.isEnabledFor(level):
        return
    fields: dict[str, Any] = {
        "method": method,
        "code": code.name,
        "duration_ms": round(seconds * 1000, 3),
        "peer": context.peer(),
        "caller": _caller_name(caller, context, client_certificates),
        "request_id": rid,
    }
    error_id = errors.error_id.get() if code == grpc.StatusCode.INTERNAL else None
    if error_id:
        fields["error_id"] = error_id
    # Made and handed to the handlers directly: Logger.log would first walk the stack for the
    # file and line of the call, which no log line prints, once per call (docs/benchmarks.md).
    record = rpc_log.makeRecord(
        rpc_log.name,
        level,
        __file__,
        0,
        "%s %s %.1f ms caller=%s peer=%s request_id=%s%s",
        (
            method,
            code.name,
            seconds * 1000,
            fields["caller"],
            fields["peer"],
            rid,
            f" error_id={error_id}" if error_id else "",
        ),
        None,
        "_log",
        {"rpc": fields},
    )
    rpc_log.handle(record)


def _request_id(metadata: Iterable[tuple[str, Any]] | None) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID and isinstance(value, str) and _USABLE_REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


def _caller_name(caller: Caller | None, context: grpc.aio.ServicerContext[Any, Any], client_certificates: bool) -> str:
    """The token's service name; else the client certificate's common name (mTLS); else '-'."""
    if caller is not None:
        return caller.name
    if not client_certificates:
        return ANONYMOUS
    name = next(iter(context.auth_context().get("x509_common_name") or ()), None)
    if name:
        return "cn=" + name.decode(errors="replace")
    return ANONYMOUS


def _refusal(refused: Refused) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]:
    """A handler that answers `refused` without running the real one."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await errors.answer(context, refused.code, str(refused))

    return refuse
