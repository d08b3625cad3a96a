"""Deadlines reach PostgreSQL: a query never outlives its caller."""

from __future__ import annotations

import logging
import time
from collections import Counter

import grpc
import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from helpers.locks import lock_waiters, row_lock, table_lock
from helpers.polling import wait_until
from helpers.rpc import create, rpc_error, update_request
from helpers.server import RunningServer
from helpers.settings import server_settings

pytestmark = pytest.mark.faults


def cancel_once_blocked(future: grpc.Future, database_url) -> None:
    """Cancel `future` once its statement waits on a lock; that statement must then leave PostgreSQL."""
    wait_until(lambda: len(lock_waiters(database_url)) == 1, message="the call's statement to wait on the lock")
    future.cancel()
    wait_until(lambda: not lock_waiters(database_url), timeout=2, message="the statement to leave PostgreSQL")


def test_a_query_does_not_outlive_its_callers_deadline(stub, database_url):
    account = create(stub)
    with row_lock(database_url, account.id):
        started = time.monotonic()
        error = rpc_error(stub.UpdateAdAccount, update_request(account.id, "late"), timeout=0.3)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 2
        # The server's statement is gone from PostgreSQL within moments of the deadline.
        wait_until(lambda: not lock_waiters(database_url), timeout=2, message="the statement to leave PostgreSQL")
    assert stub.GetAdAccount(pb.GetAdAccountRequest(id=account.id)).name == account.name, "nothing was written"


def test_a_cancelled_call_cancels_its_query(stub, database_url):
    account = create(stub)
    with row_lock(database_url, account.id):
        future = stub.UpdateAdAccount.future(update_request(account.id, "cancelled"), timeout=30)
        cancel_once_blocked(future, database_url)
    assert stub.GetAdAccount(pb.GetAdAccountRequest(id=account.id)).name == account.name


def test_a_point_read_stops_in_postgresql_at_its_deadline_and_when_cancelled(stub, database_url):
    # A read outside any transaction, awaited on the event loop: its statement must
    # still end with its caller.
    account = create(stub)
    with table_lock(database_url):
        error = rpc_error(stub.GetAdAccount, pb.GetAdAccountRequest(id=account.id), timeout=0.3)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: not lock_waiters(database_url), timeout=2, message="the statement to leave PostgreSQL")
        # A long deadline: only the cancel request can stop this one in time.
        future = stub.GetAdAccount.future(pb.GetAdAccountRequest(id=account.id), timeout=30)
        cancel_once_blocked(future, database_url)
    assert stub.GetAdAccount(pb.GetAdAccountRequest(id=account.id)) == account


def test_statements_are_capped_even_without_a_deadline(clean_db, database_url):
    running = RunningServer(server_settings(database_url, DB_STATEMENT_TIMEOUT_MAX_S=0.5))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.AdAccountServiceStub(channel)
            account = create(stub)
            with row_lock(database_url, account.id):
                started = time.monotonic()
                error = rpc_error(stub.UpdateAdAccount, update_request(account.id, "capped"))
                assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert 0.4 < time.monotonic() - started < 5
                assert "SELECT" not in error.details()
            assert running.app.database.checked_out() == 0
    finally:
        running.stop()


def test_calls_whose_deadline_expires_are_counted_and_logged_as_deadline_exceeded(stub, server, caplog):
    # Issue 12, row 4: a deadline that ran out while the answer was being sent was logged
    # as UNKNOWN at ERROR, with gRPC core's traceback, and counted as UNKNOWN.
    account = create(stub)
    caplog.set_level(logging.INFO)
    codes: Counter[grpc.StatusCode] = Counter()
    for _ in range(8):
        futures = [stub.GetAdAccount.future(pb.GetAdAccountRequest(id=account.id), timeout=0.002) for _ in range(500)]
        for future in futures:
            codes[future.exception().code() if future.exception() else grpc.StatusCode.OK] += 1
    assert codes[grpc.StatusCode.DEADLINE_EXCEEDED] > 0, codes
    # A call is logged as its handler ends, before its status is sent: once no call is running
    # and none is waiting to send its status, every line is written.
    guard = server.app.guard
    wait_until(lambda: guard.in_flight == 0 and guard.unfinished == 0, message="the server's calls to end")
    ours = [r for r in caplog.records if r.name.startswith(("adaccounts_server", "grpc"))]
    assert not [r.getMessage() for r in ours if r.levelno >= logging.ERROR][:3]
    assert not [r.getMessage() for r in ours if "UNKNOWN" in r.getMessage()][:3]
    assert not [r.getMessage() for r in ours if r.exc_info][:3]
