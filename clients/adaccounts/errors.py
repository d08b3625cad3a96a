"""The exceptions the client raises instead of grpc.RpcError.

Callers branch on what went wrong (missing, taken, stale, retry later), not on
gRPC status codes, so each status the service documents has its own class.
Every exception keeps the original status code, details and google.rpc.Status,
so nothing the server said is lost; the grpc.RpcError is chained as __cause__.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, cast

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class FieldViolation:
    """One offending request field, as named by the server's google.rpc.BadRequest."""

    field: str
    description: str


class AdAccountsError(Exception):
    """A call failed. Statuses without a class of their own (INTERNAL, RESOURCE_EXHAUSTED…) raise this."""

    def __init__(self, code: grpc.StatusCode, details: str, status: status_pb2.Status | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        #: The rich google.rpc.Status from the trailers, when the server sent one.
        self.status = status


class InvalidArgument(AdAccountsError):
    """The request was rejected as invalid; `field_violations` says which fields and why."""

    @property
    def field_violations(self) -> list[FieldViolation]:
        violations: list[FieldViolation] = []
        for detail in self.status.details if self.status is not None else ():
            bad_request = error_details_pb2.BadRequest()
            if detail.Unpack(bad_request):
                violations.extend(FieldViolation(v.field, v.description) for v in bad_request.field_violations)
        return violations


class NotFound(AdAccountsError):
    """No account has that id (for a batch: at least one of the ids)."""


class AlreadyExists(AdAccountsError):
    """Another account already has this (platform, external_id)."""


class Conflict(AdAccountsError):
    """ABORTED: the etag sent no longer matches; read the account again and redo the change."""


class Unavailable(AdAccountsError):
    """The server or its database could not be reached (after the client's retries); nothing was changed."""


class DeadlineExceeded(AdAccountsError):
    """The call's deadline passed first. A write may or may not have happened: read before redoing it."""


_BY_CODE: dict[grpc.StatusCode, type[AdAccountsError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.ABORTED: Conflict,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


class _FailedCall(Protocol):
    """What both grpc.RpcError flavours (sync and grpc.aio.AioRpcError) offer."""

    def code(self) -> grpc.StatusCode: ...
    def details(self) -> str | None: ...
    def trailing_metadata(self) -> object: ...


def from_rpc_error(error: grpc.RpcError) -> AdAccountsError:
    """The exception for a failed call, of the class its status code maps to."""
    call = cast(_FailedCall, error)
    code = call.code()
    try:
        # grpc_status types it grpc.Call; it only uses the methods above, which both flavours have.
        status = rpc_status.from_call(cast(grpc.Call, call))
    except ValueError:  # a google.rpc.Status that contradicts the call's own status: ignore it
        status = None
    return _BY_CODE.get(code, AdAccountsError)(code, call.details() or "", status)
