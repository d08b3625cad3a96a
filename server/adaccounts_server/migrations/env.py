"""Alembic environment: the URL comes from the server's own settings (one source of truth).

`adaccounts migrate` passes the URL (MIGRATION_DATABASE_URL, else DATABASE_URL) and
its limits in; plain `alembic` from the checkout (alembic.ini, for developers: e.g.
`alembic revision --autogenerate -m ...`, `alembic current`) reads them from the same
settings, and needs nothing but the URL: the serving settings (PAGE_TOKEN_SECRET, TLS,
tokens) are not checked. On PostgreSQL every run holds the migrate advisory lock and runs
under lock_timeout / statement_timeout (see adaccounts_server.migrate); each revision
commits on its own.
"""

from __future__ import annotations

import sys

from adaccounts_server import models  # noqa: F401  (registers the tables)
from adaccounts_server.config import SettingsError, load_settings
from adaccounts_server.migrate import (
    MigrationOptions,
    MigrationRun,
    offline_epilogue_sql,
    offline_preamble_sql,
    serialised,
)
from alembic import context
from sqlalchemy import create_engine, pool
from sqlmodel import SQLModel

target_metadata = SQLModel.metadata
config = context.config

if "url" not in config.attributes:  # plain `alembic`: the same settings as `adaccounts migrate`
    try:
        _settings = load_settings(serving=False)
    except SettingsError as error:
        print(f"alembic: invalid setting {error}", file=sys.stderr)  # one line, as `adaccounts migrate`
        raise SystemExit(2) from None
    config.attributes["url"] = _settings.migration_database_url
    config.attributes["options"] = MigrationOptions.from_settings(_settings)
url = config.attributes["url"]
options: MigrationOptions = config.attributes.setdefault("options", MigrationOptions())
run: MigrationRun = config.attributes.setdefault("run", MigrationRun())
dialect = url.get_backend_name()


def _record(ctx, step, heads, run_args) -> None:  # type: ignore[no-untyped-def]
    run.applied.append(step.up_revision_id)


def run_migrations_offline() -> None:
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=dialect == "sqlite",
        transaction_per_migration=True,
    )
    for statement in offline_preamble_sql(options, dialect):
        context.execute(statement)
    with context.begin_transaction():
        context.run_migrations()
    for statement in offline_epilogue_sql(dialect):
        context.execute(statement)


def run_migrations_online() -> None:
    connect_args = (
        {"connect_timeout": options.connect_timeout_s, "application_name": "adaccounts-migrate"}
        if dialect == "postgresql"
        else {}
    )
    engine = create_engine(url, poolclass=pool.NullPool, connect_args=connect_args)
    try:
        with engine.connect() as connection:
            run.connected = True
            with serialised(connection, options, run):
                context.configure(
                    connection=connection,
                    target_metadata=target_metadata,
                    render_as_batch=dialect == "sqlite",
                    compare_type=True,
                    transaction_per_migration=True,
                    on_version_apply=_record,
                )
                with context.begin_transaction():
                    context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
