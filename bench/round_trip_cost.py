"""The event loop's CPU per PostgreSQL round trip: psycopg's cursor against db._exchange.

    python bench/round_trip_cost.py [--in-flight 8] [--round-trips 3000]

Why db.py sends its messages on `connection.pgconn` (psycopg's libpq layer) instead of through
a psycopg cursor: the same point-read message (`SET LOCAL statement_timeout = N; SELECT …`),
the same connections and rows, timed as this process's CPU per round trip. Best of three
rounds each, both in one run against a throwaway PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
from adaccounts_server.db import _exchange

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers.pg_instance import ThrowawayPostgres  # tests/ is not a package; tests/helpers is

COLUMNS = "id, owner_id, platform, external_id, name, currency_code, time_zone, status, create_time, update_time"


async def cpu_per_round_trip(
    dsn: str, round_trip: Callable[[Any], Awaitable[object]], in_flight: int, count: int
) -> float:
    connections = [
        await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, cursor_factory=psycopg.AsyncClientCursor, prepare_threshold=None
        )
        for _ in range(in_flight)
    ]

    async def loop(connection: Any, n: int) -> None:
        for _ in range(n):
            await round_trip(connection)

    try:
        await asyncio.gather(*(loop(c, 200) for c in connections))  # warm
        best = float("inf")
        for _ in range(3):
            started = time.process_time()
            await asyncio.gather(*(loop(c, count) for c in connections))
            best = min(best, (time.process_time() - started) / (in_flight * count))
        return best
    finally:
        for connection in connections:
            await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--round-trips", type=int, default=3000, help="per connection and round")
    args = parser.parse_args()
    pg = ThrowawayPostgres("adaccounts_round_trip_cost")
    try:
        pg.start()
        with psycopg.connect(pg.dsn, autocommit=True) as connection:
            connection.execute(
                "CREATE TABLE ad_accounts AS SELECT gen_random_uuid() AS id, gen_random_uuid() AS owner_id,"
                " 'META'::text AS platform, 'ext_' || i AS external_id, 'Account ' || i AS name,"
                " 'EUR'::text AS currency_code, 'Europe/Paris'::text AS time_zone, 'ACTIVE'::text AS status,"
                " now() AS create_time, now() AS update_time FROM generate_series(1, 1000) AS i"
            )
            account_id = connection.execute("SELECT id FROM ad_accounts LIMIT 1").fetchone()[0]  # type: ignore[index]
        read = f"SET LOCAL statement_timeout = 5000; SELECT {COLUMNS} FROM ad_accounts WHERE id = %(id)s"
        literal = read.replace("%(id)s", f"'{account_id}'::uuid").encode()

        async def with_cursor(connection: Any) -> object:
            cursor = connection.cursor()
            await cursor.execute(read, {"id": account_id})
            cursor.nextset()
            return await cursor.fetchall()

        async def with_exchange(connection: Any) -> object:
            results = await _exchange(connection, literal)
            transformer = psycopg.adapt.Transformer(connection)
            transformer.set_pgresult(results[-1])
            return transformer.load_rows(0, results[-1].ntuples, tuple)

        for name, round_trip in (("psycopg cursor", with_cursor), ("db._exchange (pgconn)", with_exchange)):
            cpu = asyncio.run(cpu_per_round_trip(pg.dsn, round_trip, args.in_flight, args.round_trips))
            print(f"{name:24s} {cpu * 1e6:6.1f} µs of CPU per round trip ({args.in_flight} in flight, one loop)")
    finally:
        pg.cleanup()


if __name__ == "__main__":
    main()
