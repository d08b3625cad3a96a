"""What every call goes through before its handler: who is calling, and may they.

Callers authenticate with a bearer token (`authorization: Bearer <token>`
metadata) when AUTH_TOKENS is set. The server keeps only SHA-256 hashes of the
tokens, each with the calling service's name and scope (`read` or
`read-write`): a missing or unknown token is UNAUTHENTICATED, a `read` caller
asking for a write is PERMISSION_DENIED. Tokens are compared in constant time
(every hash is compared, with hmac.compare_digest) and never logged. Health and
reflection stay open, so probes and grpcurl need no token.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from .config import TokenGrant
from .service import SERVICE_NAME

# Always reachable without a token: what Kubernetes probes and grpcurl ask.
OPEN_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
WRITES = ("CreateAdAccount", "UpdateAdAccount", "DeleteAdAccount")
WRITE_METHODS = frozenset(f"/{SERVICE_NAME}/{name}" for name in WRITES)
ANONYMOUS = "-"


@dataclass(frozen=True)
class Caller:
    name: str
    scope: str  # "read" | "read-write"


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


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
    """Authenticates and authorises every call but health and reflection."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or is_open(method):
            return handler
        try:
            self._authenticator.authenticate(handler_call_details.invocation_metadata, method)
        except Refused as refused:
            return _refusing(handler, refused)
        return handler


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
