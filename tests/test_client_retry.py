"""Server restarts: the server is stopped mid-loop and a new one started on the same port
a while later, while the client keeps calling; and the bounds clients/README.md states, measured.

What makes a call made during the outage succeed is the client's wait for a connection
(connect_timeout, 5 s by default): the call is not sent while no connection is up, and goes
out as soon as the client has reconnected, which it tries every 0.1-0.5 s. A call the
stopping server refused (UNAVAILABLE) is retried by gRPC's own retry policy, and its retry
waits for the connection the same way. The control test shows that with neither (connect
timeout 0, no retry policy) the same restart fails calls; wait_for_ready waits for a
connection up to the call's deadline instead of connect_timeout.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from adaccounts import (
    AdAccountsClient,
    AdAccountsError,
    AsyncAdAccountsClient,
    ConnectionFailed,
    DeadlineExceeded,
)
from adaccounts._common import MAX_RECONNECT_BACKOFF_MS
from helpers.polling import wait_until
from helpers.ports import free_port
from helpers.rpc import new_account
from helpers.server import RunningServer
from helpers.settings import server_settings

OUTAGE_S = 1.0
#: clients/README.md's promise: once the server listens again, a waiting call goes out within the
#: longest reconnect backoff (+20 % jitter), plus the connection and the call themselves.
BACK_WITHIN_S = MAX_RECONNECT_BACKOFF_MS / 1000 * 1.2 + 0.4


class RestartableServer:
    """A RunningServer on a fixed port, so that its replacement is at the same address."""

    def __init__(self, database_url) -> None:
        port = free_port()
        self._settings = server_settings(database_url, GRPC_PORT=port)
        self.target = f"127.0.0.1:{port}"
        self._running: RunningServer | None = RunningServer(self._settings)

    def stop(self) -> None:
        if self._running is not None:
            self._running.stop()
            self._running = None

    def start(self) -> None:
        self._running = RunningServer(self._settings)


@pytest.fixture
def restartable(database_url) -> Iterator[RestartableServer]:
    server = RestartableServer(database_url)
    yield server
    server.stop()


@dataclass(frozen=True)
class Outcome:
    started: float
    ended: float
    error: AdAccountsError | None


def restart_while_calling(
    server: RestartableServer, call, outage_s: float = OUTAGE_S
) -> tuple[list[Outcome], float, float]:
    """Call `call()` in a loop on a thread while the server stops and, `outage_s` later, starts
    again; go on until three calls made after the restart have finished.

    Returns every call's outcome and the times the server was down from and back at."""
    outcomes: list[Outcome] = []
    done = threading.Event()

    def loop() -> None:
        while not done.is_set():
            started = time.monotonic()
            try:
                call()
                error = None
            except AdAccountsError as caught:
                error = caught
            outcomes.append(Outcome(started, time.monotonic(), error))
            time.sleep(0.02)  # deliberately: a steady caller, not a tight loop

    caller = threading.Thread(target=loop, name="client-loop")
    caller.start()
    try:
        wait_until(lambda: any(o.error is None for o in outcomes), message="a call to succeed before the restart")
        server.stop()
        down = time.monotonic()
        time.sleep(outage_s)  # deliberately: the outage lasts this long
        server.start()
        back = time.monotonic()
        wait_until(lambda: sum(o.started > back for o in outcomes) >= 3, 15, message="three calls after the restart")
    finally:
        done.set()
        caller.join(20)
    return outcomes, down, back


def test_a_call_made_during_a_restart_succeeds_once_the_server_is_back(restartable):
    with AdAccountsClient(restartable.target) as client:  # default retry policy, no wait_for_ready
        account = client.create(new_account())
        outcomes, down, back = restart_while_calling(restartable, lambda: client.get(account.id))

    assert [o.error for o in outcomes if o.error is not None] == []
    # The call in flight halfway through the outage (there always is one: no call can
    # finish while nothing listens) waited it out and succeeded once the server was back.
    spanning = [o for o in outcomes if o.started <= down + OUTAGE_S / 2 <= o.ended]
    assert len(spanning) == 1, "no call was in flight during the outage"
    assert spanning[0].ended >= back
    assert sum(o.started > back for o in outcomes) >= 3


def test_retried_creates_during_a_restart_make_one_account_each(restartable):
    """Create is retried too; its request_id makes a repeat harmless."""
    with AdAccountsClient(restartable.target) as client:
        owner = str(uuid.uuid4())
        outcomes, _, _ = restart_while_calling(restartable, lambda: client.create(new_account(owner_id=owner)))
        created = list(client.iter_ad_accounts(owner_id=owner))

    assert [o.error for o in outcomes if o.error is not None] == []
    assert len(created) == len(outcomes)


def test_without_the_connection_wait_and_the_retry_policy_the_same_restart_fails_calls(restartable):
    with AdAccountsClient(restartable.target, retry=None, connect_timeout=0) as client:
        account = client.create(new_account())
        outcomes, _, _ = restart_while_calling(restartable, lambda: client.get(account.id))

    errors = [o.error for o in outcomes if o.error is not None]
    assert any(isinstance(error, ConnectionFailed) for error in errors), "a restart without waiting fails calls"
    # Now and then a call the stopping server had accepted but not started comes back
    # CANCELLED (grpc/grpc#41785), or it refused it as it drained: the policy retries both.
    assert {error.code for error in errors} <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}


@pytest.mark.parametrize("outage_s", [1.0, 3.0])
def test_a_restart_holds_a_call_no_longer_than_the_outage_and_the_reconnect(restartable, outage_s):
    """clients/README.md's bound, measured: with the defaults (connect_timeout 5 s, deadline 10 s), a
    call made during a restart, or in flight when it began, returns within BACK_WITHIN_S of the
    server listening again, and the first call after that does not wait seconds."""
    with AdAccountsClient(restartable.target) as client:
        account = client.create(new_account())
        outcomes, down, back = restart_while_calling(restartable, lambda: client.get(account.id), outage_s)

    assert [o.error for o in outcomes if o.error is not None] == []
    held = [o for o in outcomes if o.ended > back and o.started < back]  # waited for the server
    assert held, "no call was waiting for the server when it came back"
    after_back = max(o.ended for o in held) - back
    longest = max(o.ended - o.started for o in outcomes)
    print(
        f"\noutage {back - down:.2f} s (stop returned → start returned): longest call {longest:.2f} s; "
        f"calls waiting for the server returned {after_back:.3f} s after it listened again"
    )
    assert after_back <= BACK_WITHIN_S
    assert longest <= (back - down) + BACK_WITHIN_S + 0.5  # + the stop itself, which drains first


def test_an_outage_longer_than_connect_timeout_fails_calls_with_connection_failed_in_time(restartable):
    """Past connect_timeout a call gives up, never having been sent: ConnectionFailed, not
    DeadlineExceeded, after connect_timeout and not after the deadline. (Calls made while the
    server is down: a call already sent when it went down is retried once it is back.)"""
    connect_timeout = 0.5
    with AdAccountsClient(restartable.target, connect_timeout=connect_timeout) as client:
        account = client.create(new_account())
        restartable.stop()
        # Until the client has seen the connection close, a call still goes out on it and is
        # retried once the server is back, within its deadline (clients/README.md): wait for that.
        wait_until(lambda: _refused(client, account.id), timeout=10, interval=0.05, message="the client to notice")
        took = []
        try:
            for _ in range(3):
                started = time.monotonic()
                with pytest.raises(ConnectionFailed) as failed:
                    client.get(account.id, timeout=30)
                took.append(time.monotonic() - started)
                assert "Connection refused" in failed.value.details
        finally:
            restartable.start()
        back = time.monotonic()
        # connect_timeout (0.5 s) is shorter than the longest reconnect backoff (0.6 s with jitter), so
        # the first call after the restart may still give up before the client's next attempt.
        assert wait_until(lambda: _get_or_none(client, account.id), timeout=BACK_WITHIN_S, interval=0) == account
        again = time.monotonic() - back
    print(f"\ncalls gave up after {', '.join(f'{t:.3f}' for t in took)} s; the next one succeeded {again:.3f} s after")
    assert all(t <= connect_timeout + 0.4 for t in took), took
    assert again <= BACK_WITHIN_S


def _refused(client: AdAccountsClient, account_id: str) -> bool:
    try:
        client.get(account_id, timeout=1)
    except ConnectionFailed:
        return True
    except DeadlineExceeded:
        return False
    raise AssertionError("a call succeeded while the server was stopped")


def _get_or_none(client: AdAccountsClient, account_id: str):
    try:
        return client.get(account_id, timeout=30)
    except ConnectionFailed:
        return None


def test_async_client_holds_a_call_no_longer_than_the_outage_and_the_reconnect(restartable):
    async def scenario() -> tuple[float, float]:
        async with AsyncAdAccountsClient(restartable.target) as client:
            account = await client.create(new_account())
            await asyncio.to_thread(restartable.stop)
            call = asyncio.ensure_future(client.get(account.id))  # made while nothing listens
            await asyncio.sleep(2.0)  # deliberately: the server stays down this long
            assert not call.done()  # still waiting for a connection
            await asyncio.to_thread(restartable.start)
            back = time.monotonic()
            assert await call == account
            returned = time.monotonic()
            fresh = time.monotonic()
            await client.get(account.id)
            return returned - back, time.monotonic() - fresh

    after_back, next_call = asyncio.run(scenario())
    print(f"\nasyncio: the waiting call returned {after_back:.3f} s after the server listened again")
    assert after_back <= BACK_WITHIN_S
    assert next_call < 0.5


def test_no_server_fails_after_connect_timeout_never_the_deadline_with_the_cause():
    """Nothing listens: ConnectionFailed after min(connect_timeout, deadline), saying why."""
    target = f"127.0.0.1:{free_port()}"
    for kwargs, expected_s in [
        ({"timeout": 2.0}, 2.0),  # the deadline is shorter than connect_timeout
        ({"connect_timeout": 0.5}, 0.5),
        ({"connect_timeout": 0}, 0.0),
        ({"wait_for_ready": True, "timeout": 1.0}, 1.0),
    ]:
        with AdAccountsClient(target, **kwargs) as client:  # type: ignore[arg-type]
            started = time.monotonic()
            with pytest.raises(ConnectionFailed) as caught:
                client.get(str(uuid.uuid4()))
            took = time.monotonic() - started
        assert expected_s - 0.05 <= took <= expected_s + 0.35, (kwargs, took)
        assert "Connection refused" in caught.value.details, caught.value.details
        assert "never sent" in caught.value.details
        assert caught.value.request_id is None
        assert caught.value.status is None
        assert not isinstance(caught.value, DeadlineExceeded)


def test_async_client_waits_across_a_restart_too(restartable):
    async def scenario() -> None:
        async with AsyncAdAccountsClient(restartable.target) as client:
            account = await client.create(new_account())
            await asyncio.to_thread(restartable.stop)
            started = time.monotonic()
            call = asyncio.ensure_future(client.get(account.id))  # made while nothing listens
            await asyncio.sleep(OUTAGE_S)  # deliberately: the outage lasts this long
            assert not call.done()  # still retrying
            await asyncio.to_thread(restartable.start)
            assert await call == account
            assert time.monotonic() - started >= OUTAGE_S

    asyncio.run(scenario())


def test_wait_for_ready_queues_a_call_until_the_server_is_back(restartable):
    """Without retries at all: the call waits for a connection instead of failing."""
    with AdAccountsClient(restartable.target, retry=None, wait_for_ready=True) as client:
        account = client.create(new_account())
        restartable.stop()
        timer = threading.Timer(2 * OUTAGE_S, restartable.start)
        timer.start()
        try:
            started = time.monotonic()
            assert client.get(account.id) == account
            assert time.monotonic() - started >= 2 * OUTAGE_S - 0.1
        finally:
            timer.join()
