"""The two databases the server runs on, for the contract tests that must pass on both:
PostgreSQL (the session's database on the shared server) and the embedded SQLite default.

A contract module says `pytestmark = pytest.mark.backends("postgresql", "sqlite")`; its tests
that take `backend` (or `stub`) then run once per database. A test that cannot hold on SQLite
(row locks, a pool of several connections, pg_stat_activity) is marked
`@pytest.mark.postgresql_only("why")` and is skipped there, saying why.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import sqlalchemy as sa
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from adaccounts_server import models
from sqlalchemy.engine import URL

from .server import RunningServer

BACKENDS = ("postgresql", "sqlite")
ACCOUNTS = models.AdAccount.__table__  # type: ignore[attr-defined]


@dataclass
class Backend:
    """One database with a server on it and a channel to that server."""

    name: str  # "postgresql" or "sqlite"
    url: URL  # for a synchronous SQLAlchemy engine (postgresql+psycopg, sqlite)
    server: RunningServer
    channel: grpc.Channel

    @property
    def stub(self) -> pb_grpc.AdAccountServiceStub:
        return pb_grpc.AdAccountServiceStub(self.channel)

    def clean(self) -> None:
        """Empty ad_accounts."""
        with self._transaction() as connection:
            if self.name == "postgresql":
                connection.execute(sa.text("TRUNCATE ad_accounts"))
            else:
                connection.execute(ACCOUNTS.delete())

    def execute(self, sql: str, **parameters: object) -> list[sa.Row]:
        """One statement on the database, committed; its rows."""
        with self._transaction() as connection:
            result = connection.execute(sa.text(sql), parameters)
            return list(result) if result.returns_rows else []

    def uuid_value(self, value: str) -> object:
        """A UUID as execute() must bind it: sa.Uuid stores 32 hex digits on SQLite, and text()
        binds what it is given."""
        return uuid.UUID(value).hex if self.name == "sqlite" else uuid.UUID(value)

    def insert(self, rows: Iterable[dict[str, Any]]) -> None:
        """Insert rows of ad_accounts as they are (times, versions and ids included), past the
        service and its rules, with the types the server's own SQLAlchemy table maps them to."""
        with self._transaction() as connection:
            connection.execute(ACCOUNTS.insert(), list(rows))

    @contextmanager
    def _transaction(self) -> Iterator[sa.Connection]:
        engine = sa.create_engine(self.url, poolclass=sa.pool.NullPool)
        try:
            with engine.begin() as connection:
                yield connection
        finally:
            engine.dispose()
