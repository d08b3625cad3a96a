"""Round trips per call, counted in a throwaway PostgreSQL's statement log, so they
cannot creep back unnoticed (issue 6). Speed itself lives in bench/, not here."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import psycopg
import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from helpers.pg_instance import ThrowawayPostgres
from helpers.polling import wait_until
from helpers.rpc import new_account
from helpers.server import RunningServer
from helpers.settings import server_settings


@contextmanager
def logged(pg: ThrowawayPostgres, **settings: object) -> Iterator[tuple[RunningServer, psycopg.Connection]]:
    """A one-connection server whose every statement the throwaway PostgreSQL logs, and a
    connection for markers in that log (`settings`: the server's, over these defaults)."""
    admin = psycopg.connect(pg.dsn, autocommit=True)
    with admin.cursor() as cursor:
        cursor.execute(f"ALTER DATABASE \"{pg.database}\" SET log_statement = 'all'")
        # Each line also names its transaction (virtual id): statements sharing one ran as one.
        cursor.execute("ALTER SYSTEM SET log_line_prefix = '%m [%p] %v '")
        cursor.execute("SELECT pg_reload_conf()")
    marker = psycopg.connect(pg.dsn, autocommit=True)  # opened after the ALTER: its markers are logged
    defaults: dict[str, object] = {
        "DB_POOL_SIZE": 1,
        "HEALTH_CHECK_INTERVAL_S": 3600,  # one ping at start, then quiet
        "DB_POOL_PRE_PING_IDLE_S": 0.5,
    }
    running = RunningServer(server_settings(pg.url, **{**defaults, **settings}))
    try:
        # The monitor's first ping and schema check are its last statements for an hour: let
        # them finish, or they land in a measured window (they run on a connection of their own).
        wait_until(lambda: running.app.monitor.serving, message="the first health check")
        yield running, marker
    finally:
        running.stop()
        marker.close()
        with admin.cursor() as cursor:
            cursor.execute(f'ALTER DATABASE "{pg.database}" RESET log_statement')
            cursor.execute("ALTER SYSTEM RESET log_line_prefix")
            cursor.execute("SELECT pg_reload_conf()")
        admin.close()


@pytest.fixture
def logged_server(throwaway_pg: ThrowawayPostgres) -> Iterator[tuple[RunningServer, psycopg.Connection]]:
    with logged(throwaway_pg) as running_and_marker:
        yield running_and_marker


def statements_during(pg: ThrowawayPostgres, marker, call) -> list[str]:  # type: ignore[no-untyped-def]
    """The statements other sessions sent while `call()` ran, in order."""
    return [text for _, text in transactions_during(pg, marker, call)]


def transactions_during(pg: ThrowawayPostgres, marker, call) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    """(transaction, statement) for each statement other sessions ran while `call()` ran, in
    order: simple queries as they were sent, prepared statements as "execute: <their SQL>"."""
    start, end = f"rt-start-{uuid.uuid4().hex}", f"rt-end-{uuid.uuid4().hex}"
    with marker.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        own_pid = cursor.fetchone()[0]
        cursor.execute(f"SELECT '{start}'")
        call()
        cursor.execute(f"SELECT '{end}'")
    wait_until(lambda: end in pg.log.read_text(errors="replace"), message="the end marker to reach the log")
    log = pg.log.read_text(errors="replace")
    window = log[log.index(start) : log.index(end)]
    pattern = re.compile(r"\[(\d+)\] (?:(\S+) )?LOG:  (?:statement|(execute) [^:]+): (.*)")
    return [
        (m.group(2), f"{m.group(3)}: {m.group(4)}" if m.group(3) else m.group(4))
        for m in pattern.finditer(window)
        if int(m.group(1)) != own_pid
    ]


def test_a_point_read_on_a_busy_connection_is_not_pre_pinged(logged_server, throwaway_pg):
    running, marker = logged_server
    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.AdAccountServiceStub(channel)
        account = stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account()), timeout=10)

        def get() -> None:
            stub.GetAdAccount(pb.GetAdAccountRequest(id=account.id), timeout=10)

        get()  # the connection was just used: no ping is due
        busy = transactions_during(throwaway_pg, marker, get)
        time.sleep(0.7)  # deliberately idle past DB_POOL_PRE_PING_IDLE_S: now it is checked first
        idle = statements_during(throwaway_pg, marker, get)

    print(f"\n[round trips] busy connection: {busy}\n[round trips] idle connection: {idle}")
    # One pipeline (DB_PREPARED_STATEMENTS, on by default): no pre-ping, no BEGIN/COMMIT; the
    # call's deadline, set in the same transaction, then the SELECT.
    assert len(busy) == 2, busy
    (timeout_in, timeout), (select_in, select) = busy
    assert re.match(r"execute: SELECT set_config\('statement_timeout', \$1, true\)", timeout), busy
    assert select.startswith("execute: SELECT ad_accounts.id"), busy
    assert timeout_in == select_in, "the timeout and the read ran in different transactions"
    # Idle past the threshold: the ping first, then the same pipeline.
    assert [s.strip().upper() for s in idle[:1]] == ["SELECT 1"], idle
    assert len(idle) == 3, idle


def test_without_prepared_statements_a_point_read_is_one_message(throwaway_pg):
    """DB_PREPARED_STATEMENTS=false, as behind PgBouncer in transaction mode: the deadline rides
    along with the SELECT in one simple-query message."""
    with (
        logged(throwaway_pg, DB_PREPARED_STATEMENTS=False) as (running, marker),
        grpc.insecure_channel(running.target) as channel,
    ):
        stub = pb_grpc.AdAccountServiceStub(channel)
        account = stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account()), timeout=10)
        busy = statements_during(
            throwaway_pg, marker, lambda: stub.GetAdAccount(pb.GetAdAccountRequest(id=account.id), timeout=10)
        )
    assert len(busy) == 1, busy
    assert re.match(r"SET LOCAL statement_timeout = \d+; SELECT ad_accounts\.id", busy[0]), busy


def test_an_idle_connection_that_is_alive_is_reused(logged_server, throwaway_pg):
    # Issue 12, row 7: the old read pool's idle pre-ping always failed, so every connection
    # idle past DB_POOL_PRE_PING_IDLE_S was dropped and a new backend logged in.
    running, _ = logged_server

    def backends() -> set[tuple[int, object]]:
        with psycopg.connect(throwaway_pg.dsn, autocommit=True) as connection:
            rows = connection.execute(
                "SELECT pid, backend_start FROM pg_stat_activity WHERE application_name = 'adaccounts'"
            ).fetchall()
        return {(pid, started) for pid, started in rows}

    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.AdAccountServiceStub(channel)
        account = stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account()), timeout=10)
        before = backends()
        for _ in range(3):
            time.sleep(0.7)  # deliberately idle past DB_POOL_PRE_PING_IDLE_S (0.5 s here): pinged, then lent
            for _ in range(8):
                stub.GetAdAccount(pb.GetAdAccountRequest(id=account.id), timeout=10)
        after = backends()
    assert len(before) == 1, before
    assert after == before, "the pooled connection was replaced instead of reused"


COMMIT = "COMMIT; SELECT PG_CURRENT_WAL_INSERT_LSN()"


def test_writes_take_one_message_per_statement_and_commit_alone(logged_server, throwaway_pg):
    running, marker = logged_server
    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.AdAccountServiceStub(channel)
        created: list[pb.AdAccount] = []

        def create() -> None:
            created.append(stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account()), timeout=10))

        create()
        creating = statements_during(throwaway_pg, marker, create)

        def update() -> None:
            stub.UpdateAdAccount(
                pb.UpdateAdAccountRequest(ad_account=pb.AdAccount(id=created[-1].id, name="Renamed")), timeout=10
            )

        updating = statements_during(throwaway_pg, marker, update)

    print(f"\n[round trips] create: {creating}\n[round trips] update: {updating}")
    # BEGIN, the transaction's id and the deadline travel with the first statement; COMMIT goes
    # once the block is done (never sent for a call that was cancelled before it), with nothing
    # but the question of the WAL position it reached (the caller's consistency token).
    assert len(creating) == 2, creating
    assert re.match(r"BEGIN; SELECT txid_current\(\); SET LOCAL statement_timeout = \d+; INSERT", creating[0])
    assert creating[1].strip().upper() == COMMIT
    assert len(updating) == 3, updating
    # (the log shows a statement's first line: the row lock's FOR UPDATE is further down)
    assert re.match(
        r"BEGIN; SELECT txid_current\(\); SET LOCAL statement_timeout = \d+; SELECT ad_accounts", updating[0]
    )
    assert re.match(r"SET LOCAL statement_timeout = \d+; UPDATE ad_accounts", updating[1])
    assert updating[2].strip().upper() == COMMIT
