"""Databases on the shared PostgreSQL, the routes to a throwaway one, and looking at rows directly."""

from __future__ import annotations

import psycopg
from sqlalchemy.engine import URL, make_url

from .pg_instance import ThrowawayPostgres
from .pgbouncer import PgBouncer
from .polling import wait_until


def libpq_url(database: URL | str) -> str:
    """What psycopg.connect takes: a SQLAlchemy URL as a postgresql:// URL; a libpq DSN as it is."""
    if isinstance(database, str):
        return database
    return database.set(drivername="postgresql").render_as_string(hide_password=False)


def create_database(admin_url: str, name: str) -> URL:
    connection = psycopg.connect(admin_url, autocommit=True)
    with connection.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    connection.close()
    return make_url(admin_url).set(drivername="postgresql+psycopg", database=name)


def drop_database(admin_url: str, name: str) -> None:
    connection = psycopg.connect(admin_url, autocommit=True)
    with connection.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    connection.close()


def stored(database: URL | str, where: str, *args: object) -> list[tuple]:
    """(id, name, version, update_time) of the rows of ad_accounts matching `where`, read directly."""
    with psycopg.connect(libpq_url(database), autocommit=True) as connection, connection.cursor() as cursor:
        cursor.execute(f"SELECT id::text, name, version, update_time FROM ad_accounts WHERE {where}", args)
        return cursor.fetchall()


class Route:
    """How a server under test reaches a throwaway PostgreSQL: directly, or through PgBouncer."""

    def __init__(self, name: str, pg: ThrowawayPostgres, bouncer: PgBouncer | None = None) -> None:
        self.name = name
        self.pg = pg  # the PostgreSQL itself, for faults and for looking at pg_stat_activity
        self.bouncer = bouncer

    @property
    def url(self) -> URL:
        """What the server under test connects to."""
        return self.bouncer.url if self.bouncer is not None else self.pg.url

    @property
    def dsn(self) -> str:
        return self.bouncer.dsn if self.bouncer is not None else self.pg.dsn

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Until a query through this route answers (PgBouncer retries logins only every few seconds)."""

        def answers() -> bool:
            try:
                connection = psycopg.connect(self.dsn)
            except psycopg.Error:
                return False
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT 1")
                return True
            except psycopg.Error:
                return False
            finally:
                connection.close()

        wait_until(answers, timeout, interval=0.1, message=f"PostgreSQL to answer through the {self.name} route")
