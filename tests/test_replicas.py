"""Read replicas (issue 15), against a throwaway primary and a streaming replica of it.

- Reads (Get, BatchGet, List) go to an in-rotation replica; writes to the primary.
- Consistency tokens (trailing metadata x-consistency-token, 16 lowercase hex digits: a WAL
  position): a read sending its write's token sees the write, whatever the replica's replay.
- Without a token a read may be stale, but never staler than REPLICA_MAX_LAG_S (plus a health
  check): past it, reads fall back to the primary.
- A replica stopped, stalled or restarted under load fails no read and leaves readiness alone,
  and comes back into rotation once it is healthy.
- A List walk whose pages come from the replica and the primary in turn returns each row once.
- A malformed token is INVALID_ARGUMENT; the replica's URL is never logged.
- AdAccountsClient passes its tokens on by itself.
- A caught-up replica stays in rotation while the primary's WAL ends on a page boundary.

Which database served a read is read off the metrics (adaccounts_db_reads_total by target):
the calls here are made one at a time, so each one's increment is its own.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator

import grpc
import psycopg
import pytest
from adaccounts import AdAccountsClient
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.polling import wait_until
from helpers.replication import PrimaryAndReplica, int_to_token, lsn_to_int
from helpers.rpc import mask, new_account
from helpers.server import RunningServer
from helpers.settings import server_settings
from prometheus_client.parser import text_string_to_metric_families

TOKEN_KEY = "x-consistency-token"
TOKEN = re.compile(r"[0-9a-f]{16}")
REPLICA = "replica-1"
PRIMARY = "primary"
READS = "adaccounts_db_reads_total"
FALLBACKS = "adaccounts_db_replica_fallbacks_total"
IN_ROTATION = "adaccounts_db_replica_in_rotation"
LAG = "adaccounts_db_replica_lag_seconds"
CALL_TIMEOUT_S = 5.0
HEALTH_CHECK_INTERVAL_S = 0.2  # how often the replicas' lag and replay position are measured (unless a test says)
# The replica's password in its URL (trust auth accepts any): what must never be logged.
REPLICA_PASSWORD = "Rpw-n3ver-logged-4e2a"


# --- the databases and the server -------------------------------------------------------------


@pytest.fixture(scope="module")
def replicated_pg() -> Iterator[PrimaryAndReplica]:
    """A migrated throwaway primary and a streaming replica of it, for the whole module."""
    with PrimaryAndReplica() as pair:
        yield pair


@pytest.fixture
def pair(replicated_pg: PrimaryAndReplica) -> Iterator[PrimaryAndReplica]:
    """The module's primary and replica, both running and caught up when the test starts and after it ends."""
    _heal(replicated_pg)
    yield replicated_pg
    _heal(replicated_pg)


def _heal(pair: PrimaryAndReplica) -> None:
    pair.unstall_replica()
    if not pair.replica.running:
        pair.start_replica()
    if pair.replay_paused():
        pair.resume_replay()
    pair.wait_caught_up()


class Servers:
    """Servers on the module's primary with its replica (metrics on), each stopped after the test."""

    def __init__(self, pair: PrimaryAndReplica) -> None:
        self.pair = pair
        self.running: list[RunningServer] = []

    def start(self, **overrides: object) -> RunningServer:
        values: dict[str, object] = {
            "DATABASE_REPLICA_URLS": self.pair.replica_urls_setting,
            "METRICS_PORT": 0,
            "DB_POOL_SIZE": 4,
            "HEALTH_CHECK_INTERVAL_S": HEALTH_CHECK_INTERVAL_S,
            **overrides,
        }
        server = RunningServer(server_settings(self.pair.primary.url, **values))
        self.running.append(server)
        return server

    def stop(self, server: RunningServer) -> None:
        self.running.remove(server)
        server.stop()

    def stop_all(self) -> None:
        while self.running:
            self.stop(self.running[-1])


@pytest.fixture
def servers(pair: PrimaryAndReplica) -> Iterator[Servers]:
    started = Servers(pair)
    yield started
    started.stop_all()


@contextlib.contextmanager
def stub_for(server: RunningServer) -> Iterator[pb_grpc.AdAccountServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield pb_grpc.AdAccountServiceStub(channel)


# --- metrics ----------------------------------------------------------------------------------


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(server: RunningServer) -> Samples:
    port = server.app.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def served(before: Samples, after: Samples) -> dict[str, float]:
    """Reads served per target between two scrapes."""
    return {
        target: value(after, READS, target=target) - value(before, READS, target=target)
        for target in (PRIMARY, REPLICA)
    }


def fallbacks(before: Samples, after: Samples, reason: str) -> float:
    return value(after, FALLBACKS, reason=reason) - value(before, FALLBACKS, reason=reason)


def wait_in_rotation(server: RunningServer, in_rotation: bool = True, timeout: float = 15.0) -> None:
    wanted = 1.0 if in_rotation else 0.0
    wait_until(
        lambda: value(scrape(server), IN_ROTATION, target=REPLICA) == wanted,
        timeout,
        interval=0.1,
        message=f"{REPLICA} to be {'in' if in_rotation else 'out of'} rotation",
    )


# --- calls --------------------------------------------------------------------------------------


def token_of(call: grpc.Call) -> str | None:
    """The x-consistency-token a call's trailing metadata carries, if any."""
    tokens = [value for key, value in call.trailing_metadata() or () if key == TOKEN_KEY]
    assert len(tokens) <= 1, f"several {TOKEN_KEY} trailers: {tokens}"
    return tokens[0] if tokens else None


def with_token(token: str | None) -> list[tuple[str, str]]:
    return [(TOKEN_KEY, token)] if token is not None else []


def create(stub: pb_grpc.AdAccountServiceStub, **fields: object) -> tuple[pb.AdAccount, str]:
    """Create an account; it and the write's consistency token."""
    account, call = stub.CreateAdAccount.with_call(
        pb.CreateAdAccountRequest(ad_account=new_account(**fields)), timeout=CALL_TIMEOUT_S
    )
    token = token_of(call)
    assert token is not None, f"a write's {TOKEN_KEY}: {token!r}"
    assert TOKEN.fullmatch(token), f"a write's {TOKEN_KEY}: {token!r}"
    return account, token


def rename(stub: pb_grpc.AdAccountServiceStub, account_id: str, name: str) -> str:
    """Rename an account; the write's consistency token."""
    updated, call = stub.UpdateAdAccount.with_call(
        pb.UpdateAdAccountRequest(ad_account=pb.AdAccount(id=account_id, name=name), update_mask=mask("name")),
        timeout=CALL_TIMEOUT_S,
    )
    assert updated.name == name
    token = token_of(call)
    assert token is not None, f"a write's {TOKEN_KEY}: {token!r}"
    assert TOKEN.fullmatch(token), f"a write's {TOKEN_KEY}: {token!r}"
    return token


def get(stub: pb_grpc.AdAccountServiceStub, account_id: str, token: str | None = None) -> tuple[pb.AdAccount, str]:
    """Read an account (sending `token`, if any); it and the read's consistency token."""
    account, call = stub.GetAdAccount.with_call(
        pb.GetAdAccountRequest(id=account_id), metadata=with_token(token), timeout=CALL_TIMEOUT_S
    )
    read_token = token_of(call)
    assert read_token is not None, f"a read's {TOKEN_KEY}: {read_token!r}"
    assert TOKEN.fullmatch(read_token), f"a read's {TOKEN_KEY}: {read_token!r}"
    return account, read_token


def replica_sees(pair: PrimaryAndReplica, account_id: str) -> str | None:
    """The account's name as the replica has it now (None: not there)."""
    with contextlib.closing(psycopg.connect(pair.replica.dsn, autocommit=True)) as connection:
        row = connection.execute("SELECT name FROM ad_accounts WHERE id = %s", (account_id,)).fetchone()
    return row[0] if row else None


# --- the helper itself --------------------------------------------------------------------------


def test_the_replica_is_a_hot_standby_that_streams_the_primary(pair: PrimaryAndReplica) -> None:
    """tests/helpers/replication.py: the replica has the migrated schema, follows the primary,
    falls behind while its replay is paused, and stalls when SIGSTOPped."""
    with contextlib.closing(psycopg.connect(pair.replica.dsn, autocommit=True)) as connection:
        assert connection.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        assert connection.execute("SELECT count(*) FROM alembic_version").fetchone() == (1,)
    owner = str(uuid.uuid4())
    with contextlib.closing(psycopg.connect(pair.primary.dsn, autocommit=True)) as connection:
        insert = (
            "INSERT INTO ad_accounts (id, owner_id, platform, external_id, name, currency_code, time_zone, status,"
            " create_time, update_time, version) VALUES (gen_random_uuid(), %s, 'META', %s, %s, 'EUR',"
            " 'Europe/Paris', 'ACTIVE', now(), now(), 1) RETURNING id::text"
        )
        (first,) = connection.execute(insert, (owner, f"ext_{uuid.uuid4().hex[:8]}", "first")).fetchone()
        pair.wait_caught_up()
        assert replica_sees(pair, first) == "first"

        pair.pause_replay()
        assert pair.replay_paused()
        (second,) = connection.execute(insert, (owner, f"ext_{uuid.uuid4().hex[:8]}", "second")).fetchone()
        time.sleep(0.5)  # more than wal_writer_delay: the WAL has reached the replica, unreplayed
        assert pair.replay_lsn() < pair.primary_lsn()
        assert replica_sees(pair, second) is None
        pair.resume_replay()
        pair.wait_caught_up()
        assert replica_sees(pair, second) == "second"

    pair.stall_replica()
    try:
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(pair.replica.dsn.replace("connect_timeout=5", "connect_timeout=1"))
    finally:
        pair.unstall_replica()
    assert replica_sees(pair, second) == "second"
    assert lsn_to_int("1/0000002A") == (1 << 32) + 42
    assert int_to_token(255) == "00000000000000ff"


# --- routing ------------------------------------------------------------------------------------


def test_reads_go_to_the_replica_and_writes_to_the_primary(pair: PrimaryAndReplica, servers: Servers) -> None:
    server = servers.start()
    with stub_for(server) as stub:
        owner = str(uuid.uuid4())
        created = [create(stub, owner_id=owner)[0] for _ in range(5)]
        pair.wait_caught_up()
        wait_in_rotation(server)

        before = scrape(server)
        # Writes, each kind: none of them is a read (a create with a request_id looks for an
        # earlier one with the same id, on the primary: part of the write).
        create(stub, owner_id=str(uuid.uuid4()))
        stub.CreateAdAccount(
            pb.CreateAdAccountRequest(ad_account=new_account(), request_id=str(uuid.uuid4())), timeout=CALL_TIMEOUT_S
        )
        rename(stub, created[0].id, "renamed")
        stub.DeleteAdAccount(pb.DeleteAdAccountRequest(id=create(stub)[0].id), timeout=CALL_TIMEOUT_S)
        for _ in range(4):
            for account in created:
                assert get(stub, account.id)[0].id == account.id
        batch, call = stub.BatchGetAdAccounts.with_call(
            pb.BatchGetAdAccountsRequest(ids=[a.id for a in created]), timeout=CALL_TIMEOUT_S
        )
        assert [a.id for a in batch.ad_accounts] == [a.id for a in created]
        assert TOKEN.fullmatch(token_of(call) or ""), "a read's token when replicas are configured"
        page, call = stub.ListAdAccounts.with_call(
            pb.ListAdAccountsRequest(owner_id=owner, page_size=10), timeout=CALL_TIMEOUT_S
        )
        assert {a.id for a in page.ad_accounts} == {a.id for a in created}
        assert TOKEN.fullmatch(token_of(call) or ""), "a read's token when replicas are configured"
        after = scrape(server)

    reads = served(before, after)
    assert reads[REPLICA] == 4 * len(created) + 2, f"reads served per target: {reads}"
    assert reads[PRIMARY] == 0, f"writes counted as reads served by the primary: {reads}"
    for reason in ("none_in_rotation", "token", "failed"):
        assert fallbacks(before, after, reason) == 0, f"a fallback ({reason}) with the replica healthy"
    assert value(after, LAG, target=REPLICA) < 5.0


def test_a_read_with_its_writes_token_sees_the_write(pair: PrimaryAndReplica, servers: Servers) -> None:
    """Read-your-writes: with replay running (the replica may or may not have it yet), and with
    replay paused (the replica stays in rotation, REPLICA_MAX_LAG_S being long, but cannot have
    it): always the write; while paused, from the primary, for the token's sake."""
    server = servers.start(REPLICA_MAX_LAG_S=60.0)
    with stub_for(server) as stub:
        account, token = create(stub, name="v0")
        pair.wait_caught_up()
        wait_in_rotation(server)

        for n in range(1, 21):  # replay running
            token = rename(stub, account.id, f"v{n}")
            read, read_token = get(stub, account.id, token)
            assert read.name == f"v{n}", f"read {n} did not see its write"
            assert int(read_token, 16) >= int(token, 16), "a read's token is at least the one it was asked for"

        pair.wait_caught_up()
        pair.pause_replay()
        before = scrape(server)
        tokens = []
        for n in range(21, 31):
            token = rename(stub, account.id, f"v{n}")
            tokens.append(token)
            read, read_token = get(stub, account.id, token)
            assert read.name == f"v{n}", f"read {n} (replay paused) did not see its write"
            assert int(read_token, 16) >= int(token, 16)
            fresh, created_token = create(stub, owner_id=account.owner_id)
            assert get(stub, fresh.id, created_token)[0].id == fresh.id, "a new account, read with its token"
        after = scrape(server)
        assert value(after, IN_ROTATION, target=REPLICA) == 1, "REPLICA_MAX_LAG_S 60 s: still in rotation"
        assert replica_sees(pair, account.id) == "v20", "replay was paused: the replica has not the writes"

    assert tokens == sorted(tokens), "tokens grow with each write (16 hex digits compare as strings)"
    reads = served(before, after)
    assert reads[PRIMARY] >= 20, f"reads served per target: {reads}"
    assert reads[REPLICA] == 0, f"reads served per target: {reads}"
    assert fallbacks(before, after, "token") >= 20


def test_the_client_object_reads_its_own_writes_through_a_lagging_replica(
    pair: PrimaryAndReplica, servers: Servers
) -> None:
    """AdAccountsClient keeps the greatest token it has seen and sends it with every read: with the
    replica's replay paused (and the replica in rotation), its reads see its writes; another
    client sees them once it observes the first one's token."""
    server = servers.start(REPLICA_MAX_LAG_S=60.0)
    with AdAccountsClient(server.target) as writer, AdAccountsClient(server.target) as other:
        account = writer.create(new_account(name="before"))
        assert writer.consistency_token is not None
        assert TOKEN.fullmatch(writer.consistency_token)
        pair.wait_caught_up()
        wait_in_rotation(server)
        time.sleep(HEALTH_CHECK_INTERVAL_S * 5)  # the server has seen the replica caught up
        assert other.get(account.id).name == "before"

        pair.pause_replay()
        before = scrape(server)
        created_token = writer.consistency_token
        writer.update(pb.AdAccount(id=account.id, name="after"), update_mask=["name"])
        assert writer.consistency_token > created_token, "the update's token is newer: the client keeps the greatest"
        added = writer.create(new_account(owner_id=account.owner_id))
        assert writer.get(account.id).name == "after"
        assert [a.id for a in writer.batch_get([account.id, added.id])] == [account.id, added.id]
        page = writer.list(owner_id=account.owner_id, page_size=10)
        assert {a.id for a in page.ad_accounts} == {account.id, added.id}
        after = scrape(server)
        assert served(before, after)[REPLICA] == 0, "the replica is behind the client's token"
        assert fallbacks(before, after, "token") == 3, "get, batch_get and list, each for the token's sake"

        assert other.get(account.id).name == "before", "no token: the replica (paused, in rotation) serves it"
        other.observe_consistency_token(writer.consistency_token)
        assert other.get(account.id).name == "after"
        assert other.batch_get([added.id])[0].id == added.id


@pytest.mark.faults
def test_without_a_token_a_read_is_never_staler_than_the_max_lag(pair: PrimaryAndReplica, servers: Servers) -> None:
    """With replay paused, reads without a token may see the replica's old state, but once the
    pause is longer than REPLICA_MAX_LAG_S the replica is out of rotation and reads go to the
    primary (fallback "none_in_rotation"); replay resumed, it is back in rotation."""
    max_lag, interval = 1.0, 0.2
    server = servers.start(REPLICA_MAX_LAG_S=max_lag, HEALTH_CHECK_INTERVAL_S=interval)
    with stub_for(server) as stub:
        account, _ = create(stub, name="before")
        pair.wait_caught_up()
        wait_in_rotation(server)

        pair.pause_replay()
        paused_at = time.monotonic()
        rename(stub, account.id, "after")
        seen: list[tuple[float, str]] = []
        before = scrape(server)
        # The pause outlasts the max lag, one health check to measure it, and one more to act on it.
        deadline = paused_at + max_lag + 2 * interval + 3.0
        while time.monotonic() < deadline:
            seen.append((time.monotonic() - paused_at, get(stub, account.id)[0].name))
            if seen[-1][1] == "after" and time.monotonic() - paused_at > max_lag + 2 * interval:
                break
            time.sleep(0.05)
        after = scrape(server)
        stale = [at for at, name in seen if name == "before"]
        print(f"stale reads: {len(stale)} of {len(seen)}, the last {max(stale, default=0):.2f} s into the pause")
        assert replica_sees(pair, account.id) == "before", "the replica's replay was paused throughout"
        assert seen[-1][1] == "after", f"reads still stale {seen[-1][0]:.1f} s into a pause ({max_lag:g} s max lag)"
        assert not stale or max(stale) <= max_lag + 2 * interval + 1.0, (
            f"a read saw the replica {max(stale):.2f} s into the pause, REPLICA_MAX_LAG_S being {max_lag:g}"
        )
        # Stale at most until the replica left the rotation; fresh every time since.
        first_fresh = next(i for i, (_, name) in enumerate(seen) if name == "after")
        assert all(name == "after" for _, name in seen[first_fresh:]), "stale again after a fresh read"
        assert value(after, IN_ROTATION, target=REPLICA) == 0
        assert value(after, LAG, target=REPLICA) > max_lag
        assert fallbacks(before, after, "none_in_rotation") >= 1
        assert value(after, READS, target=PRIMARY) > value(before, READS, target=PRIMARY)

        pair.resume_replay()
        pair.wait_caught_up()
        wait_in_rotation(server, timeout=5 * interval + 5)
        before = scrape(server)
        assert get(stub, account.id)[0].name == "after"
        assert served(before, scrape(server)) == {PRIMARY: 0, REPLICA: 1}


@pytest.mark.faults
def test_a_caught_up_replica_stays_in_rotation_when_the_wal_ends_on_a_page_boundary(
    pair: PrimaryAndReplica, servers: Servers
) -> None:
    """When the primary's last WAL record ends exactly at the end of a WAL page,
    pg_current_wal_insert_lsn() points past the next page's header (24 bytes on), and a replica
    that has replayed everything reports the page boundary. It is not behind: with the primary
    idle, it stays in rotation past REPLICA_MAX_LAG_S and serves reads. (A WAL page is 8 KiB and
    records are 8-byte aligned, so about one idle moment in a thousand ends so.)"""
    max_lag = 1.0
    server = servers.start(REPLICA_MAX_LAG_S=max_lag)
    with stub_for(server) as stub:
        account, _ = create(stub)
        pair.wait_caught_up()
        wait_in_rotation(server)
        for _attempt in range(5):
            boundary = pair.end_wal_on_a_page_boundary()
            pair.wait_caught_up()
            assert pair.replay_lsn() == boundary, "the replica has replayed everything there is"
            time.sleep(max_lag + 5 * HEALTH_CHECK_INTERVAL_S)  # idle: no write
            samples = scrape(server)
            if pair.primary_lsn() == boundary:  # else background WAL landed meanwhile: again
                break
        else:
            pytest.fail("background WAL kept landing: the WAL never stayed on a page boundary")
        lag = value(samples, LAG, target=REPLICA)
        assert value(samples, IN_ROTATION, target=REPLICA) == 1, (
            f"the replica, caught up to {int_to_token(boundary)} (the primary's insert position just past the"
            f" next page's header), is out of rotation, its lag seen as {lag:.1f} s"
        )
        before = scrape(server)
        get(stub, account.id)
        assert served(before, scrape(server)) == {PRIMARY: 0, REPLICA: 1}


# --- faults under load --------------------------------------------------------------------------


class Readers:
    """`threads` threads reading existing accounts (Get, BatchGet, List by owner) with 5 s deadlines,
    and one asking readiness every 50 ms, until stopped: every failure and every non-SERVING kept."""

    def __init__(self, target: str, owner: str, ids: list[str], threads: int = 4) -> None:
        self.channel = grpc.insecure_channel(target)
        grpc.channel_ready_future(self.channel).result(timeout=10)
        self.stub = pb_grpc.AdAccountServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.owner, self.ids = owner, ids
        self.calls: Counter[str] = Counter()
        self.failures: list[str] = []
        self.not_serving: list[str] = []
        self.probes = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._read, args=(i,), daemon=True) for i in range(threads)]
        self._threads.append(threading.Thread(target=self._probe, daemon=True))

    def __enter__(self) -> Readers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(CALL_TIMEOUT_S + 5)
        self.channel.close()

    def _read(self, index: int) -> None:
        n = index
        while not self._stop.is_set():
            n += 1
            kind = ("get", "get", "batch", "list")[n % 4]
            started = time.monotonic()
            try:
                if kind == "get":
                    account = self.stub.GetAdAccount(
                        pb.GetAdAccountRequest(id=self.ids[n % len(self.ids)]), timeout=CALL_TIMEOUT_S
                    )
                    assert account.owner_id == self.owner
                elif kind == "batch":
                    response = self.stub.BatchGetAdAccounts(
                        pb.BatchGetAdAccountsRequest(ids=self.ids[:5]), timeout=CALL_TIMEOUT_S
                    )
                    assert len(response.ad_accounts) == 5
                else:
                    page = self.stub.ListAdAccounts(
                        pb.ListAdAccountsRequest(owner_id=self.owner, page_size=len(self.ids)), timeout=CALL_TIMEOUT_S
                    )
                    assert len(page.ad_accounts) == len(self.ids)
            except (grpc.RpcError, AssertionError) as error:
                took = time.monotonic() - started
                detail = f"{error.code().name}: {error.details()}" if isinstance(error, grpc.RpcError) else str(error)
                with self._lock:
                    self.failures.append(f"{kind} after {took:.2f} s: {detail}")
            with self._lock:
                self.calls[kind] += 1

    def _probe(self) -> None:
        while not self._stop.is_set():
            try:
                status = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                if status != health_pb2.HealthCheckResponse.SERVING:
                    self.not_serving.append(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
            except grpc.RpcError as error:
                self.not_serving.append(f"{error.code().name}: {error.details()}")
            self.probes += 1
            self._stop.wait(0.05)


@pytest.mark.faults
@pytest.mark.parametrize("fault", ["stopped", "stalled", "restarted"])
def test_a_replica_going_away_under_load_fails_no_read(pair: PrimaryAndReplica, servers: Servers, fault: str) -> None:
    """Four readers with 5 s deadlines while the replica is stopped (fast shutdown), stalled
    (SIGSTOP of the postmaster and every backend: connections hang) or restarted: no read fails,
    readiness stays SERVING (it follows the primary alone), the replica leaves the rotation, and
    comes back once healthy."""
    server = servers.start(REPLICA_READ_TIMEOUT_S=1.0, HEALTH_CHECK_TIMEOUT_S=1.0)
    with stub_for(server) as stub:
        owner = str(uuid.uuid4())
        ids = [create(stub, owner_id=owner)[0].id for _ in range(8)]
    pair.wait_caught_up()
    wait_in_rotation(server)
    start = scrape(server)

    with Readers(server.target, owner, ids) as readers:
        time.sleep(1.0)
        healthy = sum(readers.calls.values())
        if fault == "stopped":
            pair.stop_replica()
            wait_in_rotation(server, False, timeout=10)
            time.sleep(2.0)
            during = scrape(server)
            pair.start_replica()
        elif fault == "stalled":
            pair.stall_replica()
            wait_in_rotation(server, False, timeout=10)
            time.sleep(2.0)
            during = scrape(server)
            pair.unstall_replica()
        else:
            pair.restart_replica()
            during = scrape(server)
        faulty = sum(readers.calls.values()) - healthy
        wait_in_rotation(server, timeout=20)
        back = scrape(server)
        time.sleep(1.5)
        readers.stop()
    end = scrape(server)

    print(
        f"{fault}: {sum(readers.calls.values())} reads ({dict(readers.calls)}), {faulty} while the replica was"
        f" {fault}; {readers.probes} readiness probes; fallbacks: "
        + ", ".join(f"{r} {fallbacks(start, end, r):g}" for r in ("none_in_rotation", "failed", "token"))
    )
    assert not readers.failures, f"{len(readers.failures)} reads failed, the first: {readers.failures[:3]}"
    assert not readers.not_serving, f"readiness left SERVING: {readers.not_serving[:5]}"
    assert readers.probes > 20, "too little happened while the replica was away to prove anything"
    assert faulty > 10, "too little happened while the replica was away to prove anything"
    if fault in ("stopped", "stalled"):
        assert value(during, IN_ROTATION, target=REPLICA) == 0
        assert served(start, during)[PRIMARY] > 0, "the primary served the reads meanwhile"
        assert fallbacks(start, during, "none_in_rotation") + fallbacks(start, during, "failed") > 0
    assert served(back, end)[REPLICA] > 0, "back in rotation, the replica serves reads again"


@pytest.mark.faults
def test_a_stalled_replica_gets_at_most_half_a_calls_deadline(pair: PrimaryAndReplica, servers: Servers) -> None:
    """A read the replica never answers is asked of the primary after REPLICA_READ_TIMEOUT_S, or
    half the call's remaining deadline if that is sooner: a 1 s call succeeds though the replica
    it was sent to (still in rotation: the monitor has not noticed yet) hangs."""
    server = servers.start(REPLICA_READ_TIMEOUT_S=3.0, HEALTH_CHECK_TIMEOUT_S=2.0)
    with stub_for(server) as stub:
        account, _ = create(stub)
        pair.wait_caught_up()
        wait_in_rotation(server)
        time.sleep(5 * HEALTH_CHECK_INTERVAL_S)  # connections made, the replica's position known
        before = scrape(server)
        pair.stall_replica()
        started = time.monotonic()
        read, _ = get_with_deadline(stub, account.id, 1.0)
        took = time.monotonic() - started
        after = scrape(server)
    assert read.id == account.id
    assert fallbacks(before, after, "failed") == 1, "sent to the stalled replica first, then to the primary"
    assert 0.4 <= took < 1.0, f"took {took:.2f} s: the replica's share is half the 1 s deadline"


def get_with_deadline(
    stub: pb_grpc.AdAccountServiceStub, account_id: str, deadline_s: float
) -> tuple[pb.AdAccount, str]:
    account, call = stub.GetAdAccount.with_call(pb.GetAdAccountRequest(id=account_id), timeout=deadline_s)
    return account, token_of(call) or ""


# --- List walks ---------------------------------------------------------------------------------


def test_a_list_walk_across_replica_and_primary_returns_each_row_once(
    pair: PrimaryAndReplica, servers: Servers
) -> None:
    """Pages of 3 in create_time order, served by the replica and the primary in turn: a page
    asked with a write's token while replay is paused comes from the primary; the page after it
    too (its page token carries the LSN the primary's page was read at); replay resumed and caught
    up, the next comes from the replica. Rows are added meanwhile (they may or may not be listed);
    every row that existed throughout is listed exactly once."""
    server = servers.start(REPLICA_MAX_LAG_S=60.0)
    with stub_for(server) as stub:
        owner = str(uuid.uuid4())
        existing = [create(stub, owner_id=owner, name=f"row {i:02}")[0].id for i in range(24)]
        pair.wait_caught_up()
        wait_in_rotation(server)

        listed: list[str] = []
        page_token, sources = "", []
        request = pb.ListAdAccountsRequest(owner_id=owner, page_size=3, order_by="create_time")

        def page(metadata: list[tuple[str, str]]) -> str:
            nonlocal page_token
            before = scrape(server)
            request.page_token = page_token
            response = stub.ListAdAccounts(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
            reads = served(before, scrape(server))
            assert sum(reads.values()) == 1, f"one page, one read: {reads}"
            listed.extend(a.id for a in response.ad_accounts)
            page_token = response.next_page_token
            source = PRIMARY if reads[PRIMARY] else REPLICA
            sources.append(source)
            return source

        n = 0
        while True:
            n += 1
            assert page([]) == REPLICA, f"page {len(sources)}: replay caught up, the replica serves it"
            if not page_token:
                break
            pair.pause_replay()
            _, token = create(stub, owner_id=owner, name=f"added {n}")  # after every existing row
            assert page(with_token(token)) == PRIMARY, f"page {len(sources)}: the replica is behind the token"
            if not page_token:
                break
            assert page([]) == PRIMARY, (
                f"page {len(sources)}: its page token says the primary's state, the replica is behind it"
            )
            pair.resume_replay()
            pair.wait_caught_up()
            # The server knows how far the replica has replayed from its health checks.
            time.sleep(HEALTH_CHECK_INTERVAL_S * 5)
            if not page_token:
                break

    assert PRIMARY in sources
    assert REPLICA in sources
    duplicates = [i for i, count in Counter(listed).items() if count > 1]
    assert not duplicates, f"listed more than once: {duplicates}"
    missing = set(existing) - set(listed)
    assert not missing, f"{len(missing)} rows that existed throughout were not listed"
    assert listed[: len(existing)] == existing, "create_time order"
    print(f"{len(sources)} pages: " + " ".join("P" if s == PRIMARY else "R" for s in sources))


# --- the token's form, and secrets --------------------------------------------------------------


MALFORMED_TOKENS = ("not-a-token", "123", "0123456789abcdef0", "0123456789abcdeg", "-123456789abcdef", "")


def test_a_malformed_consistency_token_is_invalid_argument(pair: PrimaryAndReplica, servers: Servers) -> None:
    server = servers.start()
    with stub_for(server) as stub:
        account, _ = create(stub)
        calls = {
            "GetAdAccount": (stub.GetAdAccount, pb.GetAdAccountRequest(id=account.id)),
            "BatchGetAdAccounts": (stub.BatchGetAdAccounts, pb.BatchGetAdAccountsRequest(ids=[account.id])),
            "ListAdAccounts": (stub.ListAdAccounts, pb.ListAdAccountsRequest(page_size=1)),
        }
        for token in MALFORMED_TOKENS:
            for method, (call, request) in calls.items():
                with pytest.raises(grpc.RpcError) as caught:
                    call(request, metadata=[(TOKEN_KEY, token)], timeout=CALL_TIMEOUT_S)
                error = caught.value
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (
                    f"{method} with {TOKEN_KEY} {token!r}: {error.code()} {error.details()}"
                )
                assert TOKEN_KEY in (error.details() or ""), f"{method}: the message names the metadata key"
        print(f"e.g. {error.details()}")


def test_the_replicas_url_is_never_logged(pair: PrimaryAndReplica, servers: Servers, json_log: io.StringIO) -> None:
    """Not at start-up, not when the replica goes away and comes back, not at shut-down; at DEBUG."""
    logging.getLogger().setLevel(logging.DEBUG)  # json_log puts the level back afterwards
    replica_url = pair.replica.url.set(password=REPLICA_PASSWORD)
    server = servers.start(DATABASE_REPLICA_URLS=replica_url.render_as_string(hide_password=False), LOG_LEVEL="DEBUG")
    with stub_for(server) as stub:
        account, _ = create(stub)
        pair.wait_caught_up()
        wait_in_rotation(server)
        get(stub, account.id)
        pair.stop_replica()
        wait_in_rotation(server, False)
        get(stub, account.id)
        pair.start_replica()
        wait_in_rotation(server)
        get(stub, account.id)
    servers.stop(server)
    logged = json_log.getvalue()
    assert '"level": "DEBUG"' in logged, "DEBUG logging was not on, so this proves little"
    for line in logged.splitlines():
        json.loads(line)  # one JSON object a line
    for secret in (
        REPLICA_PASSWORD,
        REPLICA_PASSWORD[:8],
        replica_url.render_as_string(hide_password=False),
        replica_url.render_as_string(hide_password=True),
        str(replica_url.set(drivername="postgresql")),
    ):
        assert secret not in logged, f"logged: {secret}"
