"""The one engine, the session scope, the database ping and the migrations.

The seed kept a module-level engine built at import; here the engine is built
from settings when the server starts and disposed when it stops, so tests and
worker processes each own theirs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, sessionmaker

from .config import Settings

log = logging.getLogger(__name__)


class Database:
    """Owns the process's engine and hands out one session per unit of work."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.database_url
        self.engine = build_engine(settings)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False, autoflush=False)

    @property
    def is_sqlite(self) -> bool:
        return self.url.get_backend_name() == "sqlite"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed if the block returns, rolled back if it raises, always closed."""
        with self._sessions() as session, session.begin():
            yield session

    def ping(self) -> None:
        """`SELECT 1` through the pool; raises when the database cannot answer."""
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def checked_out(self) -> int:
        """Connections currently lent out by the pool (zero at rest)."""
        return self.engine.pool.checkedout()  # type: ignore[attr-defined]

    def dispose(self) -> None:
        self.engine.dispose()


def build_engine(settings: Settings) -> Engine:
    url = settings.database_url
    if url.get_backend_name() == "sqlite":
        engine = create_engine(
            url,
            pool_pre_ping=True,
            pool_size=settings.pool_size,
            max_overflow=settings.DB_MAX_OVERFLOW,
            pool_timeout=settings.DB_POOL_TIMEOUT,
            # Sessions run in worker threads; the pool hands each connection to one thread at a time.
            connect_args={"check_same_thread": False, "timeout": settings.DB_POOL_TIMEOUT},
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=settings.pool_size,
        max_overflow=settings.DB_MAX_OVERFLOW,
        pool_timeout=settings.DB_POOL_TIMEOUT,
        pool_recycle=settings.DB_POOL_RECYCLE,
        connect_args={
            "connect_timeout": settings.DB_CONNECT_TIMEOUT,
            "application_name": "adaccounts",
            # Notice a peer that vanished (host down, network cut) within ~20 s
            # instead of the kernel's two hours.
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 2,
        },
    )


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def safe_url(url: URL) -> str:
    """The URL for logs: never the password."""
    return url.render_as_string(hide_password=True)


def init_db(engine: Engine) -> None:
    """Development convenience only: create the tables straight from the models.

    Production and tests build the schema with the Alembic migrations.
    """
    from sqlmodel import SQLModel

    from . import models  # noqa: F401  (registers the tables)

    SQLModel.metadata.create_all(engine)
