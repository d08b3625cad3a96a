"""The exceptions the client raises: every failed call raises an AdAccountsError, never a bare
grpc.RpcError, ValueError or TypeError.

Callers branch on what went wrong and what to do about it (fix the request, read again
and redo, retry later, call someone), not on gRPC status codes, so each status a caller
handles differently has its own class, and "never reached a server" (ConnectionFailed:
nothing was sent) is told apart from "reached it, the outcome is unknown"
(DeadlineExceeded). Every exception keeps the status code and the server's message, the
rich status from the trailers (`status`) and the request id the server logged the call
under (`request_id`, to quote to whoever runs the service); the grpc.RpcError, when there
is one, is chained as __cause__.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import grpc
from google.protobuf import any_pb2

# googleapis-common-protos ships .pyi files but no py.typed marker, so a type checker
# treats google.rpc as untyped unless googleapis-common-protos-stubs is installed, and
# grpc_status is typed by grpc-stubs but not by types-grpcio. Neither is needed: the rich
# status is exposed as RpcStatus (below), and the ignores keep `mypy -p adaccounts` clean
# with or without those stubs.
from google.rpc import error_details_pb2  # type: ignore[import-untyped, unused-ignore]
from grpc_status import rpc_status  # type: ignore[import-untyped, unused-ignore]

#: The metadata key of the request id: sent with every call (the caller's own when its
#: metadata has one), logged by the server and returned in the trailers.
REQUEST_ID_KEY = "x-request-id"

#: The metadata key of the consistency token: returned in the trailers of writes (and of reads, when
#: the server reads from replicas), sent with reads so that they see at least that database state.
CONSISTENCY_TOKEN_KEY = "x-consistency-token"

_ERROR_ID = re.compile(r"\(error id ([0-9A-Za-z]+)\)")


class RpcStatus(Protocol):
    """The rich status a server sends in the trailers (a google.rpc.Status message).

    Typed here so that callers see `code`, `message` and `details` whether or not
    they have type stubs for google.rpc; the object itself is the google.rpc.Status
    message (narrow it with isinstance if you import google.rpc.status_pb2).
    """

    @property
    def code(self) -> int: ...
    @property
    def message(self) -> str: ...
    @property
    def details(self) -> Sequence[any_pb2.Any]: ...


@dataclass(frozen=True)
class FieldViolation:
    """One offending request field, as named by the server's google.rpc.BadRequest."""

    field: str
    description: str


class AdAccountsError(Exception):
    """A call failed. Statuses without a class of their own (CANCELLED, UNKNOWN, UNIMPLEMENTED…) raise this.

    `code` is the grpc.StatusCode, `details` the server's message (or the client's, for a
    failure that never reached a server), `status` the rich status from the trailers when
    the server sent one, `request_id` the id the server logged the call under (from the
    trailers; when none came back, the one the client sent with the call; None when the
    call never left the client).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        status: RpcStatus | None = None,
        *,
        request_id: str | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {details}" + (f" (request id {request_id})" if request_id else ""))
        self.code: grpc.StatusCode = code
        self.details: str = details
        #: The rich status (a google.rpc.Status) from the trailers, when the server sent one.
        self.status: RpcStatus | None = status
        #: The x-request-id of the call: quote it to whoever runs the service.
        self.request_id: str | None = request_id


class InvalidArgument(AdAccountsError):
    """The request was rejected as invalid (by the server, or by the client before sending it).

    `field_violations` says which fields and why. Fix the request; repeating it as it is fails again.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        status: RpcStatus | None = None,
        *,
        request_id: str | None = None,
        field_violations: Sequence[FieldViolation] = (),
    ) -> None:
        super().__init__(code, details, status, request_id=request_id)
        self._field_violations = list(field_violations)

    @property
    def field_violations(self) -> list[FieldViolation]:
        violations = list(self._field_violations)
        for detail in self.status.details if self.status is not None else ():
            bad_request = error_details_pb2.BadRequest()
            if detail.Unpack(bad_request):
                violations.extend(FieldViolation(v.field, v.description) for v in bad_request.field_violations)
        return violations


class InvalidConsistencyToken(InvalidArgument, ValueError):
    """A consistency token given to the client is not one (16 hex digits, as the server returns them).

    Raised before anything is sent; both an InvalidArgument, as for any request the client cannot
    build, and a ValueError, as observe_consistency_token raises it outside any call."""


class NotFound(AdAccountsError):
    """No account has that id (for a batch: at least one of the ids)."""


class AlreadyExists(AdAccountsError):
    """Another account already has this (platform, external_id)."""


class Aborted(AdAccountsError):
    """ABORTED: the etag sent no longer matches; read the account again and redo the change."""


#: The 1.0 name of Aborted, kept so that `except Conflict` goes on working: the same class.
Conflict = Aborted


class Unauthenticated(AdAccountsError):
    """UNAUTHENTICATED: no bearer token, an unknown one, or more than one (see metadata_provider)."""


class PermissionDenied(AdAccountsError):
    """PERMISSION_DENIED: the token is valid but may not do this (a `read` token asking for a write)."""


class ResourceExhausted(AdAccountsError):
    """RESOURCE_EXHAUSTED: the server is at its limit of calls in progress (retry later, with backoff),
    or a message is over the size limit (4 MiB), which no retry fixes. Not retried automatically."""


class Internal(AdAccountsError):
    """INTERNAL: the server failed unexpectedly; nothing the caller did. `error_id` is the id the
    server logged the failure under: quote it (with `request_id`)."""

    @property
    def error_id(self) -> str | None:
        match = _ERROR_ID.search(self.details)
        return match.group(1) if match else None


class Unavailable(AdAccountsError):
    """UNAVAILABLE: the server (or its database) could not take the call, even after the client's
    retries; nothing was changed. For update and delete (never retried) it can also mean that the
    connection broke with the call on its way, which a change may have followed: read before redoing.
    Retry later."""


class ConnectionFailed(Unavailable):
    """No server was reached: no connection could be made within the call's connect_timeout
    (refused, TLS handshake failed, name not resolved…; `details` says which and how long it
    waited). The request was never sent, so nothing happened: any call, write included, is safe
    to make again. A subclass of Unavailable, so `except Unavailable` catches it too."""


class DeadlineExceeded(AdAccountsError):
    """The call reached a server (or may have) and its deadline passed before the answer came.
    The outcome is unknown: a write may or may not have happened. Read before redoing it."""


class ClientClosed(AdAccountsError):
    """The client was closed (before the call, or while it was in progress). Code CANCELLED."""


_BY_CODE: dict[grpc.StatusCode, type[AdAccountsError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


class _FailedCall(Protocol):
    """What both grpc.RpcError flavours (sync and grpc.aio.AioRpcError) offer."""

    def code(self) -> grpc.StatusCode: ...
    def details(self) -> str | None: ...
    def trailing_metadata(self) -> object: ...


def _trailer(call: _FailedCall, key: str) -> str | None:
    try:
        pairs = cast("Sequence[tuple[str, object]] | None", call.trailing_metadata())
    except Exception:  # a call that never got trailers may not offer them
        return None
    for name, value in pairs or ():
        if name == key and isinstance(value, str):
            return value
    return None


def from_rpc_error(error: grpc.RpcError, *, request_id: str | None = None) -> AdAccountsError:
    """The exception for a failed call, of the class its status code maps to.

    `request_id` is the x-request-id the call was sent with: the error carries the one
    the server returned in the trailers, or else this one.
    """
    call = cast(_FailedCall, error)
    code = call.code()
    try:
        # grpc_status types it grpc.Call; it only uses the methods above, which both flavours have.
        status = cast("RpcStatus | None", rpc_status.from_call(cast(grpc.Call, call)))
    except ValueError:  # a google.rpc.Status that contradicts the call's own status: ignore it
        status = None
    rid = _trailer(call, REQUEST_ID_KEY) or request_id
    return _BY_CODE.get(code, AdAccountsError)(code, call.details() or "", status, request_id=rid)


def invalid_request(error: Exception) -> InvalidArgument:
    """A request the client could not even build (a wrong type, an unknown enum name)."""
    return InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, f"the request could not be built: {error}")


def invalid_consistency_token(name: str, token: object) -> InvalidConsistencyToken:
    shown = repr(token) if len(repr(token)) <= 40 else repr(token)[:37] + "..."
    description = f"not a consistency token: {shown}; want 16 hex digits, as returned in {CONSISTENCY_TOKEN_KEY}"
    return InvalidConsistencyToken(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"{name}: {description}",
        field_violations=[FieldViolation(name, description)],
    )


def client_closed() -> ClientClosed:
    return ClientClosed(grpc.StatusCode.CANCELLED, "the client is closed")


#: How gRPC words a failure to connect, and what usually causes it.
_HINTS: tuple[tuple[str, bool | None, str], ...] = (
    # (text in gRPC's message, applies to a TLS channel? (None: both), hint)
    ("Connection refused", None, "nothing listens there: a server restarting, or the wrong host or port"),
    ("errors resolving", None, "the name does not resolve"),
    ("DNS resolution failed", None, "the name does not resolve"),
    ("WRONG_VERSION_NUMBER", True, "the server does not speak TLS: is it plaintext (no credentials)?"),
    ("CERTIFICATE_VERIFY_FAILED", True, "the server's certificate is not signed by the CA given (ca_file)"),
    (
        "Hostname Verification",
        True,
        "the server's certificate does not name this host (options=[('grpc.ssl_target_name_override', …)])",
    ),
    (
        "Socket closed",
        True,
        "the server closed the connection during the handshake: does it want a client certificate "
        "(cert_file and key_file), or one from another CA?",
    ),
    (
        "Socket closed",
        False,
        "the server closed the connection during the handshake: does it want TLS (credentials=tls_credentials(…))?",
    ),
)

_PICK_FAILURE_PREFIXES = (
    "connections to all backends failing; last error: ",
    "failed to connect to all addresses; last error: ",
)


def connection_failed(target: str, waited_s: float, cause: str | None, *, tls: bool) -> ConnectionFailed:
    """The error for a call that never reached a server, with gRPC's reason and a hint."""
    if cause is None:
        reason = "no answer yet (still connecting)"
    else:
        reason = cause
        for prefix in _PICK_FAILURE_PREFIXES:
            reason = reason.removeprefix(prefix)
        for text, for_tls, hint in _HINTS:
            if text in cause and for_tls in (None, tls):
                reason = f"{reason} — {hint}"
                break
    return ConnectionFailed(
        grpc.StatusCode.UNAVAILABLE,
        f"no connection to {target} within {waited_s:.1f} s, so the call was never sent: {reason}",
    )
