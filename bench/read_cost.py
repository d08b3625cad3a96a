"""The CPU one GetAdAccount read costs the event loop, without gRPC around it.

    python bench/read_cost.py [--reads-in-flight 8] [--reads 3000]

Seeds a throwaway PostgreSQL with 1,000 rows, then runs the service's own read path on
one event loop -- the id check, AdAccountRepository.get (psycopg 3 on the loop, from the
worker's pool) and the row to its protobuf message -- with N reads in flight, and prints the process's CPU time per read
and the reads per second. Set against the bare echo RPC's cost per call (bench/run.py),
it says how much of a GetAdAccount call is the database path and how much is gRPC's.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import psycopg
from adaccounts_server import convert
from adaccounts_server.config import Settings, load_settings
from adaccounts_server.db import CallScope, open_database
from adaccounts_server.migrate import upgrade_to_head
from adaccounts_server.repository import AdAccountRepository

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers.pg_instance import ThrowawayPostgres  # tests/ is not a package; tests/helpers is


async def measure(settings: Settings, account_id: str, in_flight: int, reads: int) -> tuple[float, float]:
    database = open_database(settings)
    await database.open()
    try:
        repository = AdAccountRepository(database)

        async def reader(count: int) -> None:
            for _ in range(count):
                row = await repository.get(convert.parse_id(account_id, "id"), CallScope(None))
                convert.to_proto(row)

        await asyncio.gather(*(reader(100) for _ in range(in_flight)))  # connections made, caches warm
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(reader(reads) for _ in range(in_flight)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        await database.close()
    total = in_flight * reads
    return cpu / total, total / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reads-in-flight", type=int, default=8)
    parser.add_argument("--reads", type=int, default=3000, help="reads per reader")
    args = parser.parse_args()
    pg = ThrowawayPostgres("adaccounts_read_cost")
    try:
        pg.start()
        upgrade_to_head(pg.url)
        with psycopg.connect(pg.dsn, autocommit=True) as connection:
            account_id = connection.execute(
                "INSERT INTO ad_accounts (id, owner_id, platform, external_id, name, currency_code, time_zone,"
                " status, create_time, update_time, version)"
                " SELECT gen_random_uuid(), gen_random_uuid(), 'META', 'ext_' || i, 'Account ' || i, 'EUR',"
                " 'Europe/Paris', 'ACTIVE', now(), now(), 1 FROM generate_series(1, 1000) AS i"
                " RETURNING id::text"
            ).fetchall()[0][0]
        settings = load_settings(
            DATABASE_URL=pg.url.render_as_string(hide_password=False),
            PAGE_TOKEN_SECRET="read-cost-page-token-secret",
            _env_file=None,
        )
        cpu, rate = asyncio.run(measure(settings, account_id, args.reads_in_flight, args.reads))
        print(f"{cpu * 1e6:.1f} µs of CPU per read, {rate:,.0f} reads/s, {args.reads_in_flight} in flight, one loop")
    finally:
        pg.cleanup()


if __name__ == "__main__":
    main()
