"""A server whose start fails part-way gives back what it had taken: no database connection
and no metrics endpoint is left behind in the process that tried."""

from __future__ import annotations

import asyncio
import socket

import psycopg
import pytest
from adaccounts_server.app import App
from helpers.databases import libpq_url
from helpers.polling import wait_until
from helpers.ports import free_port
from helpers.settings import server_settings
from sqlalchemy.engine import URL


def our_connections(database_url: URL) -> int:
    """Backends of the server's pool and health monitor on this test's database."""
    with psycopg.connect(libpq_url(database_url)) as connection:
        row = connection.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name LIKE 'adaccounts%'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_a_start_that_fails_part_way_releases_what_it_took(database_url: URL) -> None:
    metrics_port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        # The health port is taken: start fails after the metrics endpoint was served, the
        # pool opened (and its connections made) and the health monitor started.
        app = App(
            server_settings(
                database_url, METRICS_PORT=metrics_port, GRPC_HEALTH_PORT=taken.getsockname()[1], DB_POOL_SIZE=3
            )
        )

        async def start() -> None:
            with pytest.raises(OSError, match="cannot listen on"):
                await app.start()

        asyncio.run(start())
    wait_until(lambda: our_connections(database_url) == 0, 10, message="the pool's connections to be closed")
    assert port_is_free(metrics_port), "the metrics endpoint is still listening"
