"""Create the ad_accounts table with one index per supported list order.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PLATFORMS = ("META", "GOOGLE", "TIKTOK", "LINKEDIN", "MICROSOFT", "SNAPCHAT", "PINTEREST", "X", "AMAZON")
STATUSES = ("ACTIVE", "PAUSED", "DISABLED", "ARCHIVED")


def upgrade() -> None:
    op.create_table(
        "ad_accounts",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("owner_id", sa.Uuid(), nullable=False),
        sa.Column(
            "platform",
            sa.Enum(*PLATFORMS, name="platform", native_enum=False, create_constraint=True, length=16),
            nullable=False,
        ),
        sa.Column("external_id", sa.String(length=64), nullable=False),
        # Code-point order for names (ORDER BY name): the "C" collation on PostgreSQL.
        sa.Column(
            "name",
            sa.String(length=200).with_variant(sa.String(length=200, collation="C"), "postgresql"),
            nullable=False,
        ),
        sa.Column("currency_code", sa.String(length=3), nullable=False),
        sa.Column("time_zone", sa.String(length=64), nullable=False),
        sa.Column(
            "status",
            sa.Enum(*STATUSES, name="status", native_enum=False, create_constraint=True, length=16),
            nullable=False,
        ),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.Uuid(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_ad_accounts"),
        sa.UniqueConstraint("platform", "external_id", name="uq_ad_accounts_platform_external_id"),
        sa.UniqueConstraint("request_id", name="uq_ad_accounts_request_id"),
    )
    op.create_index("ix_ad_accounts_create_time_id", "ad_accounts", ["create_time", "id"])
    op.create_index("ix_ad_accounts_update_time_id", "ad_accounts", ["update_time", "id"])
    op.create_index("ix_ad_accounts_name_id", "ad_accounts", ["name", "id"])
    op.create_index("ix_ad_accounts_owner_id_create_time_id", "ad_accounts", ["owner_id", "create_time", "id"])


def downgrade() -> None:
    op.drop_table("ad_accounts")
