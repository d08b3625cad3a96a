"""The one mapping from what went wrong to what the caller sees.

Domain errors carry a message written for callers. Everything else (driver,
SQL, bugs) is translated here: the caller gets a status and a generic sentence,
the detail goes to the server log only, under an error id quoted to the caller.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from . import db

log = logging.getLogger(__name__)

# What an INTERNAL caller sees; the same id is in the server's log line about it.
_INTERNAL_MESSAGE = "internal error (error id {})"
# The error id of the call's INTERNAL answer, for the call's log line (guard): set in the
# handler's task, read by the guard around it in the same task.
error_id: ContextVar[str | None] = ContextVar("error_id", default=None)


class ServiceError(Exception):
    """An error whose message is safe and useful to show the caller."""

    code = grpc.StatusCode.INTERNAL


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: Iterable[FieldViolation]) -> None:
        self.violations = list(violations)
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in self.violations))

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        return cls([FieldViolation(field, description)])


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Aborted(ServiceError):
    """The resource changed since the caller read it (stale etag)."""

    code = grpc.StatusCode.ABORTED


class Unavailable(ServiceError):
    """Transient: the call changed nothing and may be retried."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


def to_status(error: BaseException) -> grpc.Status:
    """The gRPC status (with google.rpc details) a caller gets for `error`."""
    error = _translate(error)
    status = status_pb2.Status(code=error.code.value[0], message=str(error))
    if isinstance(error, InvalidArgument):
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in error.violations
            ]
        )
        detail = any_pb2.Any()
        detail.Pack(bad_request)
        status.details.append(detail)
    return rpc_status.to_status(status)


def _translate(error: BaseException) -> ServiceError:
    if isinstance(error, ServiceError):
        return error
    if isinstance(error, db.Busy):
        return Unavailable("the database is busy: no connection became free in time; retry later")
    if isinstance(error, db.TimedOut):
        return DeadlineExceeded("the database did not answer before the deadline")
    if isinstance(error, db.CommitUnknown):
        # Not UNAVAILABLE, which promises that nothing happened.
        return DeadlineExceeded(
            "the database did not confirm the write before the deadline; it may have been applied: "
            "read the account to find out"
        )
    if isinstance(error, db.Unreachable):
        return Unavailable("the database is unavailable; retry later")
    new_id = uuid.uuid4().hex[:16]
    error_id.set(new_id)
    log.error("unexpected error, error id %s", new_id, exc_info=error, extra={"error_id": new_id})
    return ServiceError(_INTERNAL_MESSAGE.format(new_id))


async def answer(
    context: grpc.aio.ServicerContext[Any, Any],
    code: grpc.StatusCode,
    details: str,
    trailing_metadata: tuple[tuple[str, str | bytes], ...] = (),
) -> NoReturn:
    """End the call with this status (context.abort), or, when gRPC could not send it because
    the call ended meanwhile (its deadline passed, its caller went away), as a cancelled call:
    that is not the server's failure, and must not read as UNKNOWN in the logs and metrics."""
    try:
        await context.abort(code, details, trailing_metadata)
    except grpc.aio.AbortError:
        raise
    except Exception:  # grpc's ExecuteBatchError: nobody is left to answer
        raise asyncio.CancelledError from None
    raise AssertionError("context.abort returned")
