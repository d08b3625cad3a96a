"""Alembic environment: the URL comes from the server's own settings (one source of truth).

`adaccounts migrate` passes the URL in; plain `alembic` (for developers, e.g.
`alembic revision --autogenerate -m ...`) reads it from the same settings.
"""

from __future__ import annotations

from adaccounts_server import models  # noqa: F401  (registers the tables)
from adaccounts_server.config import load_settings
from alembic import context
from sqlalchemy import create_engine, pool
from sqlmodel import SQLModel

target_metadata = SQLModel.metadata


def _url():  # type: ignore[no-untyped-def]
    return context.config.attributes.get("url") or load_settings().database_url


def run_migrations_offline() -> None:
    url = _url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=url.get_backend_name() == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = _url()
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=url.get_backend_name() == "sqlite",
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
