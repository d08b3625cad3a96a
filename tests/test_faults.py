"""Faults under load, against a throwaway PostgreSQL reached directly and through PgBouncer.

- PostgreSQL restarted mid-load: callers see only UNAVAILABLE, and calls succeed again as soon
  as it is back (pre-ping); the same when every backend is killed with pg_terminate_backend.
- No lost updates: twenty read-modify-write loops with etags on one account.
- No half-written rows: a write that fails at COMMIT, or whose backend is killed while it
  waits on a row lock, leaves nothing behind.

Each test prints what it measured (`pytest -m faults -s` shows it).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import grpc
import psycopg
import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.databases import Route, stored
from helpers.load import CALL_TIMEOUT_S, OK, UNAVAILABLE, Load, codes_text
from helpers.locks import row_lock
from helpers.pgbouncer import SERVER_LOGIN_RETRY_S
from helpers.polling import wait_until
from helpers.rpc import assert_clean, code_of, new_account
from helpers.server import RunningServer
from helpers.settings import server_settings

pytestmark = pytest.mark.faults

ABORTED = grpc.StatusCode.ABORTED

# How long after PostgreSQL is back every client thread must have succeeded again.
RECOVERY_BOUND_S = 5.0


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def server_on(route: Route) -> Iterator[RunningServer]:
    """A server on the route's database, its pool warm and its health SERVING."""
    running = RunningServer(server_settings(route.url))
    try:
        with grpc.insecure_channel(running.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            wait_until(
                lambda: (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                    == health_pb2.HealthCheckResponse.SERVING
                ),
                15,
                message="SERVING",
            )
        yield running
    finally:
        route.pg.resume()
        if not route.pg.running:
            route.pg.start()
        running.stop()


def superuser(route: Route):  # type: ignore[no-untyped-def]
    """A direct superuser connection to the PostgreSQL behind the route (never through PgBouncer)."""
    return psycopg.connect(route.pg.dsn, autocommit=True)


def terminate_backends(route: Route) -> int:
    """pg_terminate_backend every other backend on the test database; how many there were."""
    connection = superuser(route)
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            return cursor.fetchone()[0]
    finally:
        connection.close()


def after_back_grace(route: Route) -> float:
    """How long after PostgreSQL is back a call may still fail: at once directly (the pool's
    pre-ping replaces dead connections), PgBouncer's login retry interval through it."""
    return 0.0 if route.bouncer is None else SERVER_LOGIN_RETRY_S + 1.0


# --- restart and terminated backends under load ---------------------------------------------------


def test_restart_mid_load_gives_only_unavailable_and_recovers_at_once(route, server_on):
    pg = route.pg
    with Load(server_on.target, threads=6) as load:
        load.wait_for_successes(60)

        down = time.monotonic()
        pg.stop()
        stopped = time.monotonic()
        # Keep it down until the callers have seen the outage, and at least a second.
        wait_until(
            lambda: time.monotonic() - stopped >= 1.0 and load.codes(started_after=stopped)[UNAVAILABLE] >= 6,
            10,
            message="UNAVAILABLE answers during the outage",
        )
        pg.start()
        back = time.monotonic()
        wait_until(
            lambda: load.all_recovered_after(back), RECOVERY_BOUND_S + 10, message="every thread to succeed again"
        )
        all_back = time.monotonic()
        first = load.first_ok_after(back)
        # Steady again for a while, past PgBouncer's login retry.
        steady_until = back + after_back_grace(route) + 1.0
        load.wait_for_successes(load.successes() + 60)
        wait_until(lambda: time.monotonic() >= steady_until, 10, message="steady load after the restart")

    codes = load.codes()
    after_back = load.codes(started_after=back + after_back_grace(route))
    print(
        f"\n[restart/{route.name}] stop took {stopped - down:.2f} s, down {back - stopped:.2f} s;"
        f" recovery: first success {first - back:.3f} s after PostgreSQL was back,"
        f" every thread {all_back - back:.3f} s; calls {sum(codes.values())}: {codes_text(codes)};"
        f" during stop+outage: {codes_text(load.codes(down, back))};"
        f" started after back (+{after_back_grace(route):g} s): {codes_text(after_back)}"
    )
    assert not load.unexpected, f"only UNAVAILABLE may fail: {load.unexpected[:5]}"
    assert codes[UNAVAILABLE] > 0, "the outage was never seen"
    assert set(after_back) == {OK}, f"calls after PostgreSQL was back failed: {after_back}"
    assert first - back < RECOVERY_BOUND_S
    assert all_back - back < RECOVERY_BOUND_S + after_back_grace(route)


def test_every_backend_terminated_mid_load_gives_only_unavailable(route, server_on):
    rounds = 3
    recoveries: list[float] = []
    killed: list[int] = []
    with Load(server_on.target, threads=6) as load:
        load.wait_for_successes(60)
        for _ in range(rounds):
            moment = time.monotonic()
            killed.append(terminate_backends(route))
            wait_until(lambda moment=moment: load.all_recovered_after(moment), RECOVERY_BOUND_S + 10)
            recoveries.append(time.monotonic() - moment)
            load.wait_for_successes(load.successes() + 30)

    codes = load.codes()
    print(
        f"\n[terminate-under-load/{route.name}] {rounds} rounds, backends killed {killed};"
        f" every thread succeeded again within {', '.join(f'{r:.3f}' for r in recoveries)} s;"
        f" calls {sum(codes.values())}: {codes_text(codes)}"
    )
    assert not load.unexpected, f"only UNAVAILABLE may fail: {load.unexpected[:5]}"
    assert all(n > 0 for n in killed)
    assert max(recoveries) < RECOVERY_BOUND_S


def test_calls_after_every_idle_backend_is_terminated_succeed(route, server_on):
    stub_channel = grpc.insecure_channel(server_on.target)
    stub = pb_grpc.AdAccountServiceStub(stub_channel)
    try:
        ids = [
            stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account()), timeout=CALL_TIMEOUT_S).id
            for _ in range(8)
        ]
        # Warm every pooled connection: 24 concurrent calls on a pool of 8.
        futures = [stub.GetAdAccount.future(pb.GetAdAccountRequest(id=i), timeout=CALL_TIMEOUT_S) for i in ids * 3]
        assert all(f.result().id for f in futures)
        wait_until(lambda: server_on.app.database.checked_out() == 0, 5, message="an idle pool")

        killed = terminate_backends(route)
        # The first calls after: one at a time, then all at once (so every pooled connection is used).
        sequential = Counter(
            code_of(lambda i=i: stub.GetAdAccount(pb.GetAdAccountRequest(id=i), timeout=CALL_TIMEOUT_S))[0] for i in ids
        )
        futures = [stub.GetAdAccount.future(pb.GetAdAccountRequest(id=i), timeout=CALL_TIMEOUT_S) for i in ids * 2]
        concurrent = Counter(code_of(f.result)[0] for f in futures)
    finally:
        stub_channel.close()

    print(
        f"\n[terminate-idle/{route.name}] backends killed {killed};"
        f" first {len(ids)} calls one by one: {codes_text(sequential)}; next {len(futures)} at once: "
        f"{codes_text(concurrent)}"
    )
    assert killed > 0
    assert set(sequential) | set(concurrent) <= {OK, UNAVAILABLE}
    if route.bouncer is None:
        # Directly, the pool's pre-ping finds every dead connection before a call uses it.
        assert set(sequential) | set(concurrent) == {OK}


# --- no lost updates ------------------------------------------------------------------------------


def counter_of(account: pb.AdAccount) -> int:
    prefix, _, value = account.name.partition("-")
    assert prefix == "counter", account.name
    return int(value)


def test_no_lost_updates_with_etags(route, server_on):
    writers, increments = 20, 5
    channel = grpc.insecure_channel(server_on.target)
    stub = pb_grpc.AdAccountServiceStub(channel)
    account = stub.CreateAdAccount(
        pb.CreateAdAccountRequest(ad_account=new_account(name="counter-0")), timeout=CALL_TIMEOUT_S
    )
    written: Counter[int] = Counter()
    aborted: Counter[int] = Counter()
    unexpected: list[tuple[grpc.StatusCode, str]] = []
    start = threading.Barrier(writers)

    def writer(index: int) -> None:
        start.wait(10)
        while written[index] < increments and not unexpected:
            current = stub.GetAdAccount(pb.GetAdAccountRequest(id=account.id), timeout=CALL_TIMEOUT_S)
            request = pb.UpdateAdAccountRequest(
                ad_account=pb.AdAccount(id=account.id, name=f"counter-{counter_of(current) + 1}", etag=current.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["name"]),
            )
            code, details = code_of(lambda request=request: stub.UpdateAdAccount(request, timeout=CALL_TIMEOUT_S))
            if code == OK:
                written[index] += 1
            elif code == ABORTED:
                aborted[index] += 1  # lost the race: read again and retry
            else:
                unexpected.append((code, details))

    began = time.monotonic()
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    took = time.monotonic() - began
    try:
        assert not any(thread.is_alive() for thread in threads), "a writer never finished"
        final = stub.GetAdAccount(pb.GetAdAccountRequest(id=account.id), timeout=CALL_TIMEOUT_S)
    finally:
        channel.close()
    connection = superuser(route)
    with connection.cursor() as cursor:
        cursor.execute("SELECT name, version FROM ad_accounts WHERE id = %s", (account.id,))
        stored_name, version = cursor.fetchone()
    connection.close()

    successes = sum(written.values())
    print(
        f"\n[lost-updates/{route.name}] {writers} writers x {increments} increments in {took:.2f} s:"
        f" {successes} successful writes, {sum(aborted.values())} ABORTED"
        f" (losers: {sum(1 for i in range(writers) if aborted[i])} of {writers} writers);"
        f" final {final.name!r}, version {version}"
    )
    assert not unexpected, unexpected[:5]
    assert successes == writers * increments
    assert counter_of(final) == successes, "an increment was lost"
    assert stored_name == final.name
    assert version == 1 + successes, "every successful write is one version, no more, no less"
    assert sum(aborted.values()) > 0, "twenty concurrent writers and nobody lost a race?"


# --- no half-written rows -------------------------------------------------------------------------

FAIL_AT_COMMIT = """
CREATE OR REPLACE FUNCTION adaccounts_test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.external_id LIKE 'refused_%' OR NEW.name = 'refused' THEN
        RAISE EXCEPTION 'refused by the test trigger';
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS adaccounts_test_refuse ON ad_accounts;
CREATE CONSTRAINT TRIGGER adaccounts_test_refuse AFTER INSERT OR UPDATE ON ad_accounts
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION adaccounts_test_refuse();
"""
DROP_FAIL_AT_COMMIT = """
DROP TRIGGER IF EXISTS adaccounts_test_refuse ON ad_accounts;
DROP FUNCTION IF EXISTS adaccounts_test_refuse();
"""


@pytest.fixture
def fail_at_commit(route: Route) -> Iterator[None]:
    """A deferred constraint trigger: the INSERT or UPDATE succeeds, the COMMIT fails, for an
    external_id starting with `refused_` or a name `refused`."""
    connection = superuser(route)
    with connection.cursor() as cursor:
        cursor.execute(FAIL_AT_COMMIT)
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute(DROP_FAIL_AT_COMMIT)
        connection.close()


def test_a_create_that_fails_at_commit_leaves_no_row(route, server_on, fail_at_commit):
    with grpc.insecure_channel(server_on.target) as channel:
        stub = pb_grpc.AdAccountServiceStub(channel)
        external_id = f"refused_{uuid.uuid4().hex[:8]}"
        request_id = str(uuid.uuid4())
        request = pb.CreateAdAccountRequest(ad_account=new_account(external_id=external_id), request_id=request_id)
        with pytest.raises(grpc.RpcError) as caught:
            stub.CreateAdAccount(request, timeout=CALL_TIMEOUT_S)
        error = caught.value
        left = stored(route.pg.dsn, "external_id = %s OR request_id = %s", external_id, request_id)
        # The same request again, the trigger still there: still refused, still nothing.
        again, _ = code_of(lambda: stub.CreateAdAccount(request, timeout=CALL_TIMEOUT_S))
        left_again = stored(route.pg.dsn, "external_id = %s OR request_id = %s", external_id, request_id)

    print(f"\n[fail-at-commit create/{route.name}] {error.code().name}: {error.details()!r}; retry: {again.name}")
    assert error.code() not in (OK, grpc.StatusCode.UNKNOWN)
    if error.code() == grpc.StatusCode.INTERNAL:
        assert "error id" in error.details()
    assert_clean(error)
    assert left == [], "a failed create left a row behind"
    assert left_again == [], "a failed create left a row behind"
    assert again == error.code()


def test_an_update_that_fails_at_commit_changes_nothing(route, server_on, fail_at_commit):
    with grpc.insecure_channel(server_on.target) as channel:
        stub = pb_grpc.AdAccountServiceStub(channel)
        account = stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account()), timeout=CALL_TIMEOUT_S)
        before = stored(route.pg.dsn, "id = %s", account.id)
        with pytest.raises(grpc.RpcError) as caught:
            stub.UpdateAdAccount(
                pb.UpdateAdAccountRequest(
                    ad_account=pb.AdAccount(id=account.id, name="refused", currency_code="USD", etag=account.etag),
                    update_mask=field_mask_pb2.FieldMask(paths=["name", "currency_code"]),
                ),
                timeout=CALL_TIMEOUT_S,
            )
        error = caught.value
        after = stored(route.pg.dsn, "id = %s", account.id)
        # The etag the caller holds is still good: nothing changed.
        renamed = stub.UpdateAdAccount(
            pb.UpdateAdAccountRequest(
                ad_account=pb.AdAccount(id=account.id, name="accepted", etag=account.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["name"]),
            ),
            timeout=CALL_TIMEOUT_S,
        )

    print(f"\n[fail-at-commit update/{route.name}] {error.code().name}: {error.details()!r}")
    assert error.code() not in (OK, grpc.StatusCode.UNKNOWN)
    if error.code() == grpc.StatusCode.INTERNAL:
        assert "error id" in error.details()
    assert_clean(error)
    assert after == before, "a failed update changed the row"
    assert renamed.name == "accepted"
    assert renamed.currency_code == account.currency_code


def test_an_update_whose_backend_is_killed_while_waiting_on_a_row_lock_changes_nothing(route, server_on):
    with grpc.insecure_channel(server_on.target) as channel:
        stub = pb_grpc.AdAccountServiceStub(channel)
        account = stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account()), timeout=CALL_TIMEOUT_S)
        before = stored(route.pg.dsn, "id = %s", account.id)
        with row_lock(route.pg.dsn, account.id) as lock:
            blocked = stub.UpdateAdAccount.future(
                pb.UpdateAdAccountRequest(
                    ad_account=pb.AdAccount(id=account.id, name="never written"),
                    update_mask=field_mask_pb2.FieldMask(paths=["name"]),
                ),
                timeout=CALL_TIMEOUT_S,
            )
            waiting = wait_until(lambda: lock.waiters(), 5, message="the update to wait on the lock")
            connection = superuser(route)
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(%s)", (waiting[0],))
            connection.close()
            code, details = code_of(blocked.result)
        wait_until(lambda: server_on.app.guard.in_flight == 0, 5, message="no call in progress")
        after = stored(route.pg.dsn, "id = %s", account.id)
        current = stub.GetAdAccount(pb.GetAdAccountRequest(id=account.id), timeout=CALL_TIMEOUT_S)

    print(f"\n[killed-while-locked/{route.name}] {code.name}: {details!r}")
    assert code == UNAVAILABLE, (code, details)
    assert after == before, "the killed update changed the row"
    assert current == account
