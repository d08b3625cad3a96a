"""Read replicas: the primary for writes, streaming standbys for reads, and never an older
state than one the caller has already seen.

A read may go to a replica when two things hold:

- the replica is fresh enough: it has replayed a WAL position that the primary had reached
  no longer than REPLICA_MAX_LAG_S ago. The health monitor samples the primary's position at
  each ping (the time taken before asking it, so everything committed before that time is at
  or before it), and learns each replica's replay position at each check and from every read
  the replica serves (the position travels back in the read's own message);
- when the caller sent a consistency token (a WAL position), the replica is known to have
  replayed at least that far.

Otherwise the primary serves the read. Every write's answer and, with replicas, every read's
answer carries the position of the state it made or saw (the caller's next token), so calls
that pass their tokens on read their writes and never go back in time.

A replica that cannot be reached, does not answer within its budget (REPLICA_READ_TIMEOUT_S,
at most half the call's remaining deadline) or is not a standby is taken out of rotation; the
read is then asked of the primary, so a replica going away delays reads and fails none. The
health monitor puts it back when it answers again. Readiness is the primary's alone.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter, deque
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from . import db
from .config import Settings
from .db import (
    PRIMARY_POSITION,
    STANDBY_POSITION,
    CallScope,
    Database,
    DatabaseError,
    PostgresDatabase,
    Row,
    TimedOut,
    Transaction,
)

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

log = logging.getLogger(__name__)

# Why a read went to the primary although replicas are configured (a metric label).
NONE_IN_ROTATION = "none_in_rotation"  # every replica down, stalled, or staler than REPLICA_MAX_LAG_S
TOKEN = "token"  # no replica known to have replayed as far as the caller's token
FAILED = "failed"  # the replica chosen failed or did not answer in time


class Replica:
    """One standby, as this worker knows it."""

    def __init__(self, database: PostgresDatabase) -> None:
        self.database = database
        self.name = database.role
        self.reachable = False  # until its first check answers
        self.replayed = -1  # the greatest replay position learnt
        # Until when it may serve reads without a token: REPLICA_MAX_LAG_S after the newest
        # primary sample it is known to have replayed.
        self.fresh_until = float("-inf")
        self.reads = 0
        self.checking: asyncio.Task[None] | None = None
        self.logged: str | None = None  # what the last log line said of it: "in" or "out"

    def fresh(self, now: float) -> bool:
        return self.reachable and now <= self.fresh_until


class ReplicatedDatabase(Database):
    """The primary and its read replicas behind the one interface the repository uses."""

    def __init__(self, settings: Settings, primary: PostgresDatabase, replicas: list[PostgresDatabase]) -> None:
        super().__init__(settings)
        self.primary = primary
        self.replicas = [Replica(replica) for replica in replicas]
        primary.position_query = PRIMARY_POSITION
        for replica in replicas:
            replica.position_query = STANDBY_POSITION
        self.pool_size = primary.pool_size
        self.max_lag_s = settings.REPLICA_MAX_LAG_S
        self.read_timeout_s = settings.REPLICA_READ_TIMEOUT_S
        # (monotonic time before asking, the primary's position then), oldest first.
        self._samples: deque[tuple[float, int]] = deque()
        self._keep_samples_s = settings.REPLICA_MAX_LAG_S + 10 * settings.HEALTH_CHECK_INTERVAL_S
        self._turn = itertools.count()
        self.primary_reads = 0
        self.fallbacks: Counter[str] = Counter()

    def trace(self, tracer: Tracer) -> None:
        """The same tracer on every database: their round trips are the spans."""
        self.primary.trace(tracer)
        for replica in self.replicas:
            replica.database.trace(tracer)

    async def open(self) -> None:
        await self.primary.open()
        for replica in self.replicas:
            await replica.database.open()

    async def close(self) -> None:
        for replica in self.replicas:
            if replica.checking is not None:
                replica.checking.cancel()
                await asyncio.wait([replica.checking])
            await replica.database.close()
        await self.primary.close()

    def checked_out(self) -> int:
        return self.primary.checked_out()

    # --- reads and writes ------------------------------------------------------------------------

    async def fetch(self, statement: sa.Executable, parameters: dict[str, Any] | None, scope: CallScope) -> list[Row]:
        """A write's own lookups (a create's request_id, say): the primary's, and not counted
        among the reads served."""
        return await self.primary.fetch(statement, parameters, scope)

    def transaction(self, scope: CallScope) -> AbstractAsyncContextManager[Transaction]:
        return self.primary.transaction(scope)

    async def read(self, statement: sa.Executable, parameters: dict[str, Any] | None, scope: CallScope) -> list[Row]:
        replica, reason = self._choose(scope.min_lsn)
        if replica is not None:
            attempt, budget = self._attempt_scope(scope)
            try:
                # The budget bounds the wait for a pooled connection too, not only the statement.
                async with asyncio.timeout(budget):
                    rows = await replica.database.fetch_once(statement, parameters, attempt)
            except (DatabaseError, TimeoutError) as error:
                scope.remaining()  # the caller's own deadline passed: TimedOut, no second try
                if not (isinstance(error, TimedOut) and error.answered):
                    self._take_out(replica, _gist(error))
                reason = FAILED
            else:
                replica.reads += 1
                if attempt.lsn is not None:
                    self._replayed(replica, attempt.lsn)
                scope.saw(attempt.lsn)
                return rows
        self.fallbacks[reason] += 1
        self.primary_reads += 1
        return await self.primary.fetch(statement, parameters, scope)

    def _choose(self, min_lsn: int | None) -> tuple[Replica | None, str]:
        """A replica for a read (in turn among those that qualify), or why none. With a token,
        the replica must also have replayed that far: a token never makes a read staler."""
        now = time.monotonic()
        fresh = [replica for replica in self.replicas if replica.fresh(now)]
        if not fresh:
            return None, NONE_IN_ROTATION
        if min_lsn is not None:
            fresh = [replica for replica in fresh if replica.replayed >= min_lsn]
            if not fresh:
                return None, TOKEN
        return fresh[next(self._turn) % len(fresh)], ""

    def _attempt_scope(self, scope: CallScope) -> tuple[CallScope, float]:
        """The caller's scope with a deadline that leaves the primary time for a second try,
        and that budget in seconds."""
        budget = self.read_timeout_s
        remaining = scope.remaining()
        if remaining is not None:
            budget = min(budget, remaining / 2)
        return CallScope(time.monotonic() + budget, scope.min_lsn), budget

    # --- what is known of each replica -----------------------------------------------------------

    def _replayed(self, replica: Replica, position: int) -> None:
        """The replica has replayed `position`: it has every sample of the primary at or before it."""
        if position <= replica.replayed:
            return
        replica.replayed = position
        for taken_at, primary_position in reversed(self._samples):
            if primary_position <= position:
                replica.fresh_until = max(replica.fresh_until, taken_at + self.max_lag_s)
                break

    def _sample(self, taken_at: float, position: int) -> None:
        self._samples.append((taken_at, position))
        while self._samples and self._samples[0][0] < taken_at - self._keep_samples_s:
            self._samples.popleft()
        for replica in self.replicas:
            if replica.replayed >= position:
                replica.fresh_until = max(replica.fresh_until, taken_at + self.max_lag_s)

    def _take_out(self, replica: Replica, why: str) -> None:
        replica.reachable = False
        if replica.logged != "out":
            log.warning("%s: out of rotation (%s); its reads go to the primary", replica.name, why)
            replica.logged = "out"

    def _put_back(self, replica: Replica) -> None:
        replica.reachable = True
        if replica.logged != "in":
            log.info("%s: answering; it serves reads while within REPLICA_MAX_LAG_S", replica.name)
            replica.logged = "in"

    def lag_s(self, replica: Replica) -> float | None:
        """How stale the replica may be now, as far as this worker knows (None: no measure yet)."""
        if replica.fresh_until == float("-inf"):
            return None
        return max(0.0, time.monotonic() - (replica.fresh_until - self.max_lag_s))

    def in_rotation(self, replica: Replica) -> bool:
        return replica.fresh(time.monotonic())

    # --- health --------------------------------------------------------------------------------

    async def ping(self, timeout: float) -> None:
        """The primary's ping (readiness is the primary's alone), which samples its WAL
        position; each replica is checked beside it, never holding it up."""
        taken_at = time.monotonic()
        position = await self.primary.ping_position(timeout)
        self._sample(taken_at, position)
        for replica in self.replicas:
            if replica.checking is None or replica.checking.done():
                replica.checking = asyncio.create_task(self._check(replica, timeout), name=f"check-{replica.name}")

    async def _check(self, replica: Replica, timeout: float) -> None:
        try:
            position = await replica.database.replay_position(timeout)
        except DatabaseError as error:
            self._take_out(replica, _gist(error))
            return
        except Exception as error:  # a bug: keep it out of rotation, say what
            self._take_out(replica, type(error).__name__)
            return
        self._replayed(replica, position)
        self._put_back(replica)

    async def schema_revisions(self, timeout: float) -> tuple[str, ...]:
        return await self.primary.schema_revisions(timeout)


def _gist(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "no answer within REPLICA_READ_TIMEOUT_S"
    return str(error) if isinstance(error, DatabaseError) else type(error).__name__


def open_database(settings: Settings) -> Database:
    """The database DATABASE_URL names, with its read replicas when DATABASE_REPLICA_URLS
    names some (not yet opened)."""
    if not settings.replica_urls:
        return db.open_database(settings)
    primary = PostgresDatabase(settings)
    replicas = [
        PostgresDatabase(settings, url, role=f"replica-{number}")
        for number, url in enumerate(settings.replica_urls, start=1)
    ]
    return ReplicatedDatabase(settings, primary, replicas)
