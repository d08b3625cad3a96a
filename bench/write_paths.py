"""The write path two ways, on one event loop: the service's psycopg pool, or SQLAlchemy's AsyncSession.

    python bench/write_paths.py [--seconds 5] [--concurrency 32] [--rounds 2] [--warmup 1]
        [--server postgresql+psycopg://postgres@127.0.0.1:5432]

Why: the issue leaves a design decision to us and asks that it be measured -- "Whether writes go
through SQLAlchemy's AsyncEngine / AsyncSession over psycopg or through the psycopg pool with
statements SQLAlchemy compiled once is your call -- measure both on the write path and keep one
pool either way." This script is that measurement, without gRPC around it.

What it measures, in one run against one throwaway database (``CREATE DATABASE bench_writes_<random>``
on the server --server names, migrated to head, dropped at the end, Ctrl-C and SIGTERM included):

- A, the service's own path: ``AdAccountRepository`` over ``PostgresDatabase`` (one
  ``psycopg_pool.AsyncConnectionPool`` of DB_POOL_SIZE=8; SQLAlchemy Core statements compiled once,
  sent as simple-query messages on the connection's ``pgconn`` with client-side binding; the
  first statement of a transaction travels as ``BEGIN; SELECT txid_current(); SET LOCAL
  statement_timeout = N; <stmt>``, then ``COMMIT; SELECT pg_current_wal_insert_lsn()``). Create = ``repository.create``
  (one INSERT ... RETURNING); Update = ``repository.update`` of the name (SELECT ... FOR UPDATE,
  etag check, UPDATE ... RETURNING).
- B, the alternative: ``create_async_engine("postgresql+psycopg://...", pool_size=8, max_overflow=0)``
  and the ORM's ``AsyncSession`` (expire_on_commit=False) on the ``AdAccount`` SQLModel table, every
  transaction opening with ``SET LOCAL statement_timeout = 30000`` (the service's guarantee: no
  transaction without a statement_timeout). Create = ``session.add(AdAccount(...))`` and commit;
  Update = ``session.get(AdAccount, id, with_for_update=True)``, the same etag check, a new name,
  ``version`` + 1 and ``update_time`` bumped, commit. B runs with the dialect's defaults, so
  psycopg's server-side binding and its automatic prepared statements (prepare_threshold=5).

Each measurement is --concurrency writer tasks (default 32) looping for --seconds (default 5)
against an 8-connection pool. Each Update writer cycles through rows of its own (seeded through
A before the clock starts), so writers never wait on each other's row locks. After a warm-up of
both paths the rounds alternate A, B, A, B ... (--rounds of each, default 2), each round measuring
Create then Update. Every round is printed as it ends; the summary table gives, for each path and
operation, the BEST round -- the highest ops/s and the lowest CPU µs per op, each taken on its own,
as the least disturbed estimate on a noisy machine -- and B ÷ A for both. CPU is this process's
``time.process_time()`` over the measurement, divided by the operations completed: what one write
costs the event loop that would be serving RPCs. PostgreSQL's own CPU is not in it, but shares the
machine, so ops/s is bounded by both.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import secrets
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import sqlalchemy as sa
from adaccounts_server.config import load_settings
from adaccounts_server.db import CallScope, Database, open_database
from adaccounts_server.domain import NewAccount, Update, as_utc
from adaccounts_server.migrate import upgrade_to_head
from adaccounts_server.models import AdAccount, Platform, Status
from adaccounts_server.repository import AdAccountRepository
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

POOL_SIZE = 8
ROWS_PER_UPDATE_WRITER = 16
STATEMENT_TIMEOUT = sa.text("SET LOCAL statement_timeout = 30000")  # DB_STATEMENT_TIMEOUT_MAX_S's 30 s

COLUMNS = f"{'Create ops/s':>12} {'CPU µs/op':>10} {'Update ops/s':>13} {'CPU µs/op':>10}"

Op = Callable[[int, int], Awaitable[None]]  # (writer, its n-th operation)


@dataclass(frozen=True)
class Sample:
    ops: int
    wall_s: float
    cpu_s: float

    @property
    def rate(self) -> float:
        return self.ops / self.wall_s

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.ops * 1e6


# --- the throwaway database ----------------------------------------------------------------------


def create_database(server: URL, name: str) -> URL:
    with psycopg.connect(_conninfo(server.set(database="postgres")), autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return server.set(database=name)


def drop_database(server: URL, name: str) -> None:
    with psycopg.connect(_conninfo(server.set(database="postgres")), autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _conninfo(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


# --- what the writers write ----------------------------------------------------------------------

_serial = itertools.count()


def _new_values() -> dict[str, Any]:
    n = next(_serial)
    return {
        "owner_id": uuid.uuid4(),
        "platform": Platform.META,
        "external_id": f"bench-{n}",
        "name": f"Account {n}",
        "currency_code": "EUR",
        "time_zone": "Europe/Paris",
        "status": Status.ACTIVE,
    }


class Rows:
    """The rows the Update writers own (writer w: rows[w]), each one's current version, and how
    many rows both paths have created (checked against the table once the run is over)."""

    def __init__(self, concurrency: int) -> None:
        self.owned: list[list[uuid.UUID]] = [[] for _ in range(concurrency)]
        self.version: dict[uuid.UUID, int] = {}
        self.created = 0

    def pick(self, writer: int, n: int) -> uuid.UUID:
        mine = self.owned[writer]
        return mine[n % len(mine)]


# --- A: the service's own path -------------------------------------------------------------------


class ServicePath:
    label = "A psycopg pool (service)"

    def __init__(self, url: URL, rows: Rows) -> None:
        settings = load_settings(
            _env_file=None,
            DATABASE_URL=url.render_as_string(hide_password=False),
            PAGE_TOKEN_SECRET="x" * 20,
            DB_POOL_SIZE=POOL_SIZE,
        )
        self.db: Database = open_database(settings)
        self.repository = AdAccountRepository(self.db)
        self.rows = rows

    async def open(self) -> None:
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()

    async def create(self, writer: int, n: int) -> None:
        await self.repository.create(NewAccount(**_new_values()), None, CallScope(None))
        self.rows.created += 1

    async def update(self, writer: int, n: int) -> None:
        row_id = self.rows.pick(writer, n)
        change = {"name": f"Renamed {next(_serial)}"}
        row = await self.repository.update(Update(row_id, str(self.rows.version[row_id]), change), CallScope(None))
        self.rows.version[row_id] = row.version

    async def seed(self, concurrency: int) -> None:
        """ROWS_PER_UPDATE_WRITER rows for each Update writer, created through this path."""

        async def seed_one(writer: int) -> None:
            for _ in range(ROWS_PER_UPDATE_WRITER):
                row = await self.repository.create(NewAccount(**_new_values()), None, CallScope(None))
                self.rows.owned[writer].append(row.id)
                self.rows.version[row.id] = row.version
                self.rows.created += 1

        await asyncio.gather(*(seed_one(writer) for writer in range(concurrency)))


# --- B: SQLAlchemy's AsyncEngine and the ORM's AsyncSession --------------------------------------


class OrmPath:
    label = "B AsyncSession (ORM)"

    def __init__(self, url: URL, rows: Rows) -> None:
        self.engine: AsyncEngine = create_async_engine(
            url.set(drivername="postgresql+psycopg"), pool_size=POOL_SIZE, max_overflow=0
        )
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self.rows = rows

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        await self.engine.dispose()

    async def create(self, writer: int, n: int) -> None:
        now = datetime.now(UTC)
        async with self.sessions() as session:
            await session.execute(STATEMENT_TIMEOUT)
            session.add(AdAccount(id=uuid.uuid4(), create_time=now, update_time=now, version=1, **_new_values()))
            await session.commit()
        self.rows.created += 1

    async def update(self, writer: int, n: int) -> None:
        row_id = self.rows.pick(writer, n)
        etag = str(self.rows.version[row_id])
        async with self.sessions() as session:
            await session.execute(STATEMENT_TIMEOUT)
            account = await session.get(AdAccount, row_id, with_for_update=True)
            if account is None:
                raise RuntimeError(f"row {row_id} vanished")
            if str(account.version) != etag:  # the service's etag check (domain.etag_of)
                raise RuntimeError(f"row {row_id}: etag {etag} is stale")
            account.name = f"Renamed {next(_serial)}"
            # As the service does: never move update_time backwards.
            account.update_time = max(datetime.now(UTC), as_utc(account.update_time) + timedelta(microseconds=1))
            account.version += 1
            await session.commit()
        self.rows.version[row_id] = account.version


# --- measuring -----------------------------------------------------------------------------------


async def measure(op: Op, concurrency: int, seconds: float) -> Sample:
    """`concurrency` writers calling `op` back to back until `seconds` have passed."""
    done = [0] * concurrency

    async def writer(index: int, stop: float) -> None:
        n = 0
        while time.perf_counter() < stop:
            await op(index, n)
            n += 1
        done[index] = n

    gc.collect()
    cpu, wall = time.process_time(), time.perf_counter()
    stop = wall + seconds
    await asyncio.gather(*(writer(index, stop) for index in range(concurrency)))
    return Sample(sum(done), time.perf_counter() - wall, time.process_time() - cpu)


async def run(url: URL, concurrency: int, seconds: float, rounds: int, warmup: float) -> None:
    rows = Rows(concurrency)
    paths = [ServicePath(url, rows), OrmPath(url, rows)]
    results: dict[tuple[str, str], list[Sample]] = {}
    try:
        for path in paths:
            await path.open()
        await paths[0].seed(concurrency)
        if warmup > 0:  # connections made, statements compiled, caches and prepared statements warm
            for path in paths:
                await measure(path.create, concurrency, warmup)
                await measure(path.update, concurrency, warmup)
        print(f"{'round':<6} {'path':<26} {COLUMNS}")
        for round_ in range(1, rounds + 1):
            for path in paths:
                create = await measure(path.create, concurrency, seconds)
                update = await measure(path.update, concurrency, seconds)
                results.setdefault((path.label, "Create"), []).append(create)
                results.setdefault((path.label, "Update"), []).append(update)
                print(
                    f"{round_:<6} {path.label:<26} {create.rate:>12,.0f} {create.cpu_us:>10,.0f}"
                    f" {update.rate:>13,.0f} {update.cpu_us:>10,.0f}",
                    flush=True,
                )
    finally:
        for path in paths:
            await path.close()
    await check(url, rows)
    report(results, [path.label for path in paths], concurrency, seconds, rounds)


async def check(url: URL, rows: Rows) -> None:
    """Every write counted was made: the table holds the rows created, at the versions the writers saw."""
    async with await psycopg.AsyncConnection.connect(_conninfo(url)) as connection:
        (count,) = await (await connection.execute("SELECT count(*) FROM ad_accounts")).fetchone() or (0,)
        found = await (
            await connection.execute("SELECT id, version FROM ad_accounts WHERE id = ANY(%s)", [list(rows.version)])
        ).fetchall()
    if count != rows.created or dict(found) != rows.version:
        raise RuntimeError(f"the table disagrees with the writers: {count} rows for {rows.created} created")
    print(f"checked: {count:,} rows created, {sum(rows.version.values()) - len(rows.version):,} updates applied")


def report(
    results: dict[tuple[str, str], list[Sample]], labels: list[str], concurrency: int, seconds: float, rounds: int
) -> None:
    def best(label: str, operation: str) -> tuple[float, float]:
        samples = results[(label, operation)]
        return max(s.rate for s in samples), min(s.cpu_us for s in samples)

    print()
    print(
        f"Write path, {concurrency} writers, pool of {POOL_SIZE}, {seconds:g} s per measurement;"
        f" best of {rounds} rounds (highest ops/s, lowest CPU µs/op, each on its own)"
    )
    print(f"{'':<26} {COLUMNS}")
    table = {label: (*best(label, "Create"), *best(label, "Update")) for label in labels}
    for label, (c_rate, c_cpu, u_rate, u_cpu) in table.items():
        print(f"{label:<26} {c_rate:>12,.0f} {c_cpu:>10,.0f} {u_rate:>13,.0f} {u_cpu:>10,.0f}")
    a, b = table[labels[0]], table[labels[1]]
    ratios = [y / x for x, y in zip(a, b, strict=True)]
    print(f"{'B ÷ A':<26} {ratios[0]:>12.2f} {ratios[1]:>10.2f} {ratios[2]:>13.2f} {ratios[3]:>10.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each measurement (default 5)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent writer tasks (default 32)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each path, alternating A, B (default 2)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of each operation per path first")
    parser.add_argument(
        "--server",
        default="postgresql+psycopg://postgres@127.0.0.1:5432",
        help="the PostgreSQL server to create the throwaway database on",
    )
    args = parser.parse_args()
    if args.seconds <= 0 or args.concurrency < 1 or args.rounds < 1:
        parser.error("--seconds, --concurrency and --rounds must be positive")

    # Ctrl-C ends the run with KeyboardInterrupt (asyncio.run cancels the writers first), and so does
    # SIGTERM, made a SIGINT: the database is dropped either way. SIGINT's handler is set explicitly
    # because a shell starts background jobs with SIGINT ignored, and Python then leaves it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    server = make_url(args.server)
    name = f"bench_writes_{secrets.token_hex(4)}"
    try:
        url = create_database(server, name)
        print(f"database {name} on {server.host}:{server.port or 5432}", flush=True)
        upgrade_to_head(url)
        print(
            f"sqlalchemy {sa.__version__}, psycopg {psycopg.__version__};"
            f" {args.concurrency} writers, {args.seconds:g} s each, {args.rounds} rounds",
            flush=True,
        )
        asyncio.run(run(url, args.concurrency, args.seconds, args.rounds, args.warmup))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        drop_database(server, name)
        print(f"database {name} dropped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
