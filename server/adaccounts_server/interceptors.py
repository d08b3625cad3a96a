"""What every call goes through before its handler: who is calling, and may they.

Callers authenticate with a bearer token (`authorization: Bearer <token>`
metadata) when AUTH_TOKENS is set. The server keeps only SHA-256 hashes of the
tokens, each with the calling service's name and scope (`read` or
`read-write`): a missing or unknown token is UNAUTHENTICATED, a `read` caller
asking for a write is PERMISSION_DENIED. Tokens are compared in constant time
(every hash is compared, with hmac.compare_digest) and never logged. Health and
reflection stay open, so probes and grpcurl need no token.

Every unary call is also logged, once, when it ends: method, status code,
duration, peer, caller and request id (the caller's `x-request-id` metadata
when it sends a usable one, else a new one; returned in the trailing
metadata either way). Calls that fail on the server's side (INTERNAL,
UNAVAILABLE, ...) are logged at WARNING or ERROR, the rest at INFO, and
health checks at DEBUG, so LOG_LEVEL=WARNING keeps only the failures.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from . import logs
from .config import TokenGrant
from .errors import error_id_of
from .metrics import Metrics
from .service import SERVICE_NAME

rpc_log = logging.getLogger("adaccounts_server.rpc")

# Always reachable without a token: what Kubernetes probes and grpcurl ask.
OPEN_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
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


def service_of(method: str) -> str:
    """`/pkg.Service/Method` → `pkg.Service`."""
    return method.lstrip("/").split("/", 1)[0]


def is_open(method: str) -> bool:
    return service_of(method) in OPEN_SERVICES


class Authenticator:
    """Bearer tokens → the calling service, from the hashes in AUTH_TOKENS (None: no authentication)."""

    def __init__(self, grants: Mapping[str, TokenGrant] | None) -> None:
        self.enabled = grants is not None
        self._grants = [(bytes.fromhex(digest), grant) for digest, grant in (grants or {}).items()]

    def authenticate(self, metadata: Sequence[tuple[str, Any]] | None, method: str) -> Caller | None:
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


def _bearer_token(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key != "authorization":
            continue
        if isinstance(value, bytes):
            return None
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        return token if scheme.lower() == "bearer" and token else None
    return None


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates and authorises every call but health and reflection; logs and counts every unary call."""

    def __init__(self, authenticator: Authenticator, metrics: Metrics | None = None) -> None:
        self._authenticator = authenticator
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return handler
        metadata = handler_call_details.invocation_metadata
        caller: Caller | None = None
        if not is_open(method):
            try:
                caller = self._authenticator.authenticate(metadata, method)
            except Refused as refused:
                handler, caller = _refusing(handler, refused), refused.caller
        if handler.request_streaming or handler.response_streaming:
            return handler  # health Watch and reflection: long-lived streams, not logged
        observed = _Observed(handler.unary_unary, method, caller, _request_id(metadata), self._metrics)

        async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:
            # A coroutine function, not a callable object: grpc.aio tells them apart with inspect.
            return await observed.run(request, context)

        return grpc.unary_unary_rpc_method_handler(
            behaviour,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class _Observed:
    """Runs one unary handler with the request id in place, then logs how the call ended."""

    def __init__(
        self,
        behaviour: Callable[..., Awaitable[Any]],
        method: str,
        caller: Caller | None,
        rid: str,
        metrics: Metrics | None,
    ) -> None:
        self._behaviour = behaviour
        self._method = method
        self._caller = caller
        self._request_id = rid
        self._metrics = metrics

    async def run(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        logs.request_id.set(self._request_id)  # this call's own context: seen by its handler's log lines
        context.set_trailing_metadata(((REQUEST_ID, self._request_id),))
        if self._metrics is not None:
            self._metrics.call_started(self._method)
        code = grpc.StatusCode.OK
        try:
            response = await self._behaviour(request, context)
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
                self._metrics.call_ended(self._method, code, seconds)
            self._log(context, code, seconds)

    def _log(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, seconds: float) -> None:
        if is_open(self._method):
            level = logging.DEBUG
        elif code == grpc.StatusCode.INTERNAL or code == grpc.StatusCode.UNKNOWN:
            level = logging.ERROR
        elif code in SERVER_FAULTS:
            level = logging.WARNING
        else:
            level = logging.INFO
        if not rpc_log.isEnabledFor(level):
            return
        fields: dict[str, Any] = {
            "method": self._method,
            "code": code.name,
            "duration_ms": round(seconds * 1000, 3),
            "peer": context.peer(),
            "caller": _caller_name(self._caller, context),
            "request_id": self._request_id,
        }
        error_id = error_id_of(context.details()) if code == grpc.StatusCode.INTERNAL else None
        if error_id:
            fields["error_id"] = error_id
        rpc_log.log(
            level,
            "%s %s %.1f ms caller=%s peer=%s request_id=%s%s",
            self._method,
            code.name,
            seconds * 1000,
            fields["caller"],
            fields["peer"],
            self._request_id,
            f" error_id={error_id}" if error_id else "",
            extra={"rpc": fields},
        )


def _request_id(metadata: Sequence[tuple[str, Any]] | None) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID and isinstance(value, str) and _USABLE_REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


def _caller_name(caller: Caller | None, context: grpc.aio.ServicerContext) -> str:
    """The token's service name; else the client certificate's common name (mTLS); else '-'."""
    if caller is not None:
        return caller.name
    names = context.auth_context().get("x509_common_name")
    if names:
        return "cn=" + names[0].decode(errors="replace")
    return ANONYMOUS


def _refusing(handler: grpc.RpcMethodHandler, refused: Refused) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers `refused` without running it."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(refused.code, str(refused))

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, handler.request_deserializer, handler.response_serializer)
