"""adaccounts_server.errors.to_status as pure logic, no server: each domain and database error
becomes its documented status code and message; anything else INTERNAL with an error id; and
nothing internal (SQL, driver, host, password) ever reaches the caller."""

from __future__ import annotations

import logging

import grpc
import psycopg
import pytest
from adaccounts_server import db, errors
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

# What a database driver's or a bug's message may hold, none of which a caller may see.
INSIDE = (
    "SELECT id FROM ad_accounts WHERE id = $1; connection to server at 10.1.2.3, port 5432 failed; password=hunter2"
)
LEAKS = ("SELECT", "ad_accounts", "10.1.2.3", "5432", "hunter2", "psycopg", "Traceback")


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str, status_pb2.Status]:
    """(code, message, google.rpc.Status) of the answer a caller gets for `error`."""
    status = errors.to_status(error)
    ((key, value),) = status.trailing_metadata
    assert key == rpc_status.GRPC_DETAILS_METADATA_KEY
    details = status_pb2.Status.FromString(value)
    assert (details.code, details.message) == (status.code.value[0], status.details)
    return status.code, status.details, details


def assert_clean(message: str) -> None:
    for leak in LEAKS:
        assert leak.lower() not in message.lower(), f"{leak!r} leaked: {message}"


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.NotFound("ad account 3f2504e0-4f89-41d3-9a0c-0305e82c3301 not found"), grpc.StatusCode.NOT_FOUND),
        (errors.AlreadyExists("META account act_1 exists: 3f2504e0"), grpc.StatusCode.ALREADY_EXISTS),
        (errors.Aborted("the account changed since it was read (etag 3, now 4)"), grpc.StatusCode.ABORTED),
        (errors.Unavailable("the server is shutting down; retry"), grpc.StatusCode.UNAVAILABLE),
        (errors.DeadlineExceeded("too late"), grpc.StatusCode.DEADLINE_EXCEEDED),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else None,
)
def test_a_domain_error_keeps_its_code_and_its_message_for_the_caller(error, code):
    assert status_of(error)[:2] == (code, str(error))
    assert not status_of(error)[2].details


def test_invalid_argument_carries_every_field_violation_as_a_bad_request():
    error = errors.InvalidArgument(
        [
            errors.FieldViolation("ad_account.name", "required"),
            errors.FieldViolation("ids[3]", "must be a UUID in canonical form"),
        ]
    )
    code, message, details = status_of(error)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message == "ad_account.name: required; ids[3]: must be a UUID in canonical form"
    (detail,) = details.details
    bad_request = error_details_pb2.BadRequest()
    assert detail.Unpack(bad_request)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("ad_account.name", "required"),
        ("ids[3]", "must be a UUID in canonical form"),
    ]
    assert errors.InvalidArgument.field("page_token", "invalid").violations == [
        errors.FieldViolation("page_token", "invalid")
    ]


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (db.Busy(INSIDE), grpc.StatusCode.UNAVAILABLE, "the database is busy"),
        (db.Unreachable(INSIDE), grpc.StatusCode.UNAVAILABLE, "the database is unavailable; retry later"),
        (db.Unreachable(INSIDE, connection_lost=True), grpc.StatusCode.UNAVAILABLE, "the database is unavailable"),
        (db.TimedOut(INSIDE), grpc.StatusCode.DEADLINE_EXCEEDED, "the database did not answer before the deadline"),
        # Not UNAVAILABLE, which promises that nothing happened.
        (db.CommitUnknown(INSIDE), grpc.StatusCode.DEADLINE_EXCEEDED, "the database did not confirm the write"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else None,
)
def test_a_database_error_is_its_status_with_a_message_of_the_services_own(error, code, message):
    got_code, got_message, details = status_of(error)
    assert got_code == code
    assert got_message.startswith(message)
    assert_clean(got_message)
    assert not details.details


def test_a_commit_whose_outcome_is_unknown_says_to_read_the_account():
    assert "may have been applied" in status_of(db.CommitUnknown("lost"))[1]


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError(INSIDE),
        KeyError(INSIDE),
        psycopg.OperationalError(INSIDE),
        db.UniqueViolation(INSIDE),  # the repository's to turn into ALREADY_EXISTS; unexpected here
        db.DatabaseError(INSIDE),
    ],
    ids=lambda error: type(error).__name__,
)
def test_anything_else_is_internal_with_an_error_id_and_the_detail_only_in_the_log(error, caplog):
    caplog.set_level(logging.ERROR, logger="adaccounts_server.errors")
    code, message, details = status_of(error)
    assert code == grpc.StatusCode.INTERNAL
    assert not details.details
    assert message.startswith("internal error (error id ")
    assert message.endswith(")")
    error_id = message.removeprefix("internal error (error id ").removesuffix(")")
    assert len(error_id) == 16
    assert int(error_id, 16) >= 0
    assert_clean(message)
    (record,) = caplog.records
    assert error_id in record.getMessage()
    assert record.exc_info is not None
    assert record.exc_info[1] is error


def test_every_internal_error_gets_an_id_of_its_own(caplog):
    caplog.set_level(logging.CRITICAL, logger="adaccounts_server.errors")
    assert len({status_of(RuntimeError("x"))[1] for _ in range(20)}) == 20
