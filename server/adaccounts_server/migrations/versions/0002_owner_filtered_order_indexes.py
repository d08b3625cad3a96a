"""Index the owner-filtered list orders on update_time and name.

ListAdAccounts with owner_id and order_by `update_time desc`, `name` or `name desc`
otherwise walks a whole-table index and filters, or sorts every row of the owner.
(owner_id, create_time, id) already serves the default order.

On PostgreSQL the indexes are built CONCURRENTLY: no lock that blocks reads or
writes, so this runs on a live, populated table. A concurrent build cannot run in
a transaction, and a failed one (lock_timeout while it waits for older writers, a
killed Job) leaves an INVALID index behind: each build first drops any such
leftover, so a retry simply starts over.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import context, op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "ad_accounts"
INDEXES = {
    "ix_ad_accounts_owner_id_update_time_id": ["owner_id", "update_time", "id"],
    "ix_ad_accounts_owner_id_name_id": ["owner_id", "name", "id"],
}


def _postgresql() -> bool:
    return op.get_context().dialect.name == "postgresql"


def _statement_timeout_ms() -> int:
    # The limit env.py set for every statement (MIGRATION_STATEMENT_TIMEOUT_S), restored after the builds.
    options = context.config.attributes.get("options")
    return max(1, round(options.statement_timeout_s * 1000)) if options is not None else 60_000


def upgrade() -> None:
    if not _postgresql():
        for name, columns in INDEXES.items():
            op.create_index(name, TABLE, columns)
        return
    with op.get_context().autocommit_block():
        # A concurrent build blocks no reads or writes but may take long on a large table:
        # no statement_timeout for it. lock_timeout still bounds its waits for older writers.
        op.execute("SET statement_timeout = 0")
        for name, columns in INDEXES.items():
            op.drop_index(name, table_name=TABLE, postgresql_concurrently=True, if_exists=True)
            op.create_index(name, TABLE, columns, postgresql_concurrently=True)
        op.execute(f"SET statement_timeout = {_statement_timeout_ms()}")


def downgrade() -> None:
    if not _postgresql():
        for name in INDEXES:
            op.drop_index(name, table_name=TABLE)
        return
    with op.get_context().autocommit_block():
        for name in INDEXES:
            op.drop_index(name, table_name=TABLE, postgresql_concurrently=True, if_exists=True)
