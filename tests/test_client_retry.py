"""Retries across a server restart: the server is stopped mid-loop and a new one started on
the same port about a second later, while the client keeps calling.

What makes a call made during the outage succeed is gRPC's own retry policy (from the
client's service config): each attempt fails fast with UNAVAILABLE while nothing listens,
and a later attempt, up to about 5.6 s after the first, finds the server back (the client
also reconnects within 0.25-5 s instead of gRPC's default of up to 120 s). The control test
shows that without the policy the same restart fails calls; wait_for_ready is the other way
to ride out an outage, by queueing the call instead of failing it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from adaccounts import AdAccountsClient, AdAccountsError, AsyncAdAccountsClient, Unavailable
from conftest import RunningServer, new_account, test_settings

OUTAGE_S = 1.0


class RestartableServer:
    """A RunningServer on a fixed port, so that its replacement is at the same address."""

    def __init__(self, database_url) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self._settings = test_settings(database_url, GRPC_PORT=port)
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


def restart_while_calling(server: RestartableServer, call) -> tuple[list[Outcome], float, float]:
    """Call `call()` in a loop on a thread while the server stops and, OUTAGE_S later, starts
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
            time.sleep(0.02)

    caller = threading.Thread(target=loop, name="client-loop")
    caller.start()
    try:
        time.sleep(0.3)
        server.stop()
        down = time.monotonic()
        time.sleep(OUTAGE_S)
        server.start()
        back = time.monotonic()
        deadline = back + 15
        while sum(o.started > back for o in outcomes) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
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


def test_without_the_retry_policy_the_same_restart_fails_calls(restartable):
    with AdAccountsClient(restartable.target, retry=None) as client:
        account = client.create(new_account())
        outcomes, _, _ = restart_while_calling(restartable, lambda: client.get(account.id))

    errors = [o.error for o in outcomes if o.error is not None]
    assert any(isinstance(error, Unavailable) for error in errors), "a restart without retries fails calls"
    # Now and then a call the stopping server had accepted but not started comes back
    # CANCELLED (grpc/grpc#41785): the policy retries that status too.
    assert {error.code for error in errors} <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}


def test_async_client_retries_across_a_restart_too(restartable):
    async def scenario() -> None:
        async with AsyncAdAccountsClient(restartable.target) as client:
            account = await client.create(new_account())
            await asyncio.to_thread(restartable.stop)
            started = time.monotonic()
            call = asyncio.ensure_future(client.get(account.id))  # made while nothing listens
            await asyncio.sleep(OUTAGE_S)
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
