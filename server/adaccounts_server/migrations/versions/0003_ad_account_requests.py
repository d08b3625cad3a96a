"""Keep CreateAdAccount's request ids in a table of their own: ad_account_requests.

A request id is bound to its request's content (a hash) and outlives the account it
created, so that a retry with another body is refused and a retry after a delete does not
create the account again (AIP-155). Expand only: ad_accounts.request_id stays, and is still
written, for the release before this one, which looks request ids up there.

The table is backfilled from ad_accounts.request_id (hash NULL: the content of those
requests was never recorded). On PostgreSQL the backfill reads ad_accounts in batches of
BATCH rows in request_id order, each batch its own short transaction: nothing but ACCESS
SHARE locks on the live table (reads and writes go on), no long transaction holding back
vacuum, no statement near MIGRATION_STATEMENT_TIMEOUT_S. A run that fails half way leaves
the table and the batches done so far; the retry creates nothing twice (IF NOT EXISTS) and
copies only what is missing (ON CONFLICT DO NOTHING). A request an old pod makes during the
rollout, after its batch was copied, is found by the server in ad_accounts.request_id.
`adaccounts migrate --sql` prints the backfill as one statement.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "ad_account_requests"
BATCH = 10_000

_COLUMNS = "request_id, account_id, request_hash, create_time"
_FROM_ACCOUNTS = "SELECT request_id, id, NULL, create_time FROM ad_accounts WHERE request_id IS NOT NULL"
# PostgreSQL, one batch: the next BATCH request ids after :after (all from the start without
# it), copied; the last of them returned (none when done): where the next batch starts.
_BATCH = """
WITH batch AS (
    SELECT request_id, id, create_time FROM ad_accounts
    WHERE request_id IS NOT NULL {after}
    ORDER BY request_id LIMIT {limit}
), copied AS (
    INSERT INTO ad_account_requests ({columns})
    SELECT request_id, id, NULL, create_time FROM batch
    ON CONFLICT (request_id) DO NOTHING
)
SELECT request_id FROM batch ORDER BY request_id DESC LIMIT 1
"""
_FIRST_BATCH = sa.text(_BATCH.format(after="", limit=BATCH, columns=_COLUMNS))
_NEXT_BATCH = sa.text(_BATCH.format(after="AND request_id > :after", limit=BATCH, columns=_COLUMNS))


def upgrade() -> None:
    # IF NOT EXISTS: a retry after a failed backfill finds them already there (committed).
    op.create_table(
        TABLE,
        sa.Column("request_id", sa.Uuid(), nullable=False),
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("request_hash", sa.LargeBinary(), nullable=True),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("request_id", name="pk_ad_account_requests"),
        if_not_exists=True,
    )
    # A new, empty table no one uses yet: a plain build, in this transaction.
    op.create_index("ix_ad_account_requests_create_time", TABLE, ["create_time"], if_not_exists=True)

    postgresql = op.get_context().dialect.name == "postgresql"
    if not postgresql:  # SQLite: the embedded default, one process, migrated before it serves
        op.execute(f"INSERT INTO {TABLE} ({_COLUMNS}) {_FROM_ACCOUNTS}")
        return
    if context.is_offline_mode():
        op.execute(f"INSERT INTO {TABLE} ({_COLUMNS}) {_FROM_ACCOUNTS} ON CONFLICT (request_id) DO NOTHING")
        return
    with op.get_context().autocommit_block():  # the table committed, then one transaction per batch
        connection = op.get_bind()
        after = connection.execute(_FIRST_BATCH).scalar()
        while after is not None:
            after = connection.execute(_NEXT_BATCH, {"after": after}).scalar()


def downgrade() -> None:
    op.drop_index("ix_ad_account_requests_create_time", table_name=TABLE)
    op.drop_table(TABLE)
