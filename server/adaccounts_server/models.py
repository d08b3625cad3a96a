"""The tables: ad_accounts and ad_account_requests. The Alembic migrations must agree with them (a test checks)."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import TYPE_CHECKING, ClassVar

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

NAME_MAX = 200
EXTERNAL_ID_MAX = 64
TIME_ZONE_MAX = 64

# Code-point order for names on PostgreSQL (the "C" collation compares UTF-8
# bytes); SQLite's default BINARY collation already does.
NameType = sa.String(NAME_MAX).with_variant(sa.String(NAME_MAX, collation="C"), "postgresql")


class Platform(enum.Enum):
    META = "META"
    GOOGLE = "GOOGLE"
    TIKTOK = "TIKTOK"
    LINKEDIN = "LINKEDIN"
    MICROSOFT = "MICROSOFT"
    SNAPCHAT = "SNAPCHAT"
    PINTEREST = "PINTEREST"
    X = "X"
    AMAZON = "AMAZON"


class Status(enum.Enum):
    ACTIVE = "ACTIVE"
    PAUSED = "PAUSED"
    DISABLED = "DISABLED"
    ARCHIVED = "ARCHIVED"


def _enum_type(enum_class: type[enum.Enum], name: str) -> sa.Enum:
    # VARCHAR plus a CHECK constraint: adding a value is a migration that
    # swaps the constraint, never an ALTER TYPE.
    return sa.Enum(enum_class, name=name, native_enum=False, create_constraint=True, length=16)


class AdAccount(SQLModel, table=True):
    __tablename__ = "ad_accounts"
    __table_args__ = (
        sa.UniqueConstraint("platform", "external_id", name="uq_ad_accounts_platform_external_id"),
        sa.UniqueConstraint("request_id", name="uq_ad_accounts_request_id"),
        # One index per supported order (keyset pagination reads them in order).
        sa.Index("ix_ad_accounts_create_time_id", "create_time", "id"),
        sa.Index("ix_ad_accounts_update_time_id", "update_time", "id"),
        sa.Index("ix_ad_accounts_name_id", "name", "id"),
        sa.Index("ix_ad_accounts_owner_id_create_time_id", "owner_id", "create_time", "id"),
        # The same orders filtered by owner (migration 0002).
        sa.Index("ix_ad_accounts_owner_id_update_time_id", "owner_id", "update_time", "id"),
        sa.Index("ix_ad_accounts_owner_id_name_id", "owner_id", "name", "id"),
    )
    if TYPE_CHECKING:  # set by SQLModel's metaclass, which does not declare it
        __table__: ClassVar[sa.Table]

    id: uuid.UUID = Field(sa_column=sa.Column(sa.Uuid, primary_key=True))
    owner_id: uuid.UUID = Field(sa_column=sa.Column(sa.Uuid, nullable=False))
    platform: Platform = Field(sa_column=sa.Column(_enum_type(Platform, "platform"), nullable=False))
    external_id: str = Field(sa_column=sa.Column(sa.String(EXTERNAL_ID_MAX), nullable=False))
    name: str = Field(sa_column=sa.Column(NameType, nullable=False))
    currency_code: str = Field(sa_column=sa.Column(sa.String(3), nullable=False))
    time_zone: str = Field(sa_column=sa.Column(sa.String(TIME_ZONE_MAX), nullable=False))
    status: Status = Field(sa_column=sa.Column(_enum_type(Status, "status"), nullable=False))
    create_time: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))
    update_time: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))
    # Bumped by every change; the etag is derived from it.
    version: int = Field(sa_column=sa.Column(sa.Integer, nullable=False))
    # The CreateAdAccount request_id that created this row (AIP-155), if any. Still written, for
    # the releases before ad_account_requests (migration 0003) that look request ids up here;
    # cleared when the request id is forgotten. ad_account_requests is what this code reads.
    request_id: uuid.UUID | None = Field(default=None, sa_column=sa.Column(sa.Uuid, nullable=True))


class AdAccountRequest(SQLModel, table=True):
    """A CreateAdAccount request_id and what it created (AIP-155), kept for
    REQUEST_ID_RETENTION_S after the request, whatever becomes of the account since."""

    __tablename__ = "ad_account_requests"
    __table_args__ = (sa.Index("ix_ad_account_requests_create_time", "create_time"),)
    if TYPE_CHECKING:  # set by SQLModel's metaclass, which does not declare it
        __table__: ClassVar[sa.Table]

    request_id: uuid.UUID = Field(sa_column=sa.Column(sa.Uuid, primary_key=True))
    # The account the request created. No foreign key: the request outlives the account, so
    # that a retry after a delete is answered NOT_FOUND rather than creating it again.
    account_id: uuid.UUID = Field(sa_column=sa.Column(sa.Uuid, nullable=False))
    # SHA-256 of the request's content (domain.NewAccount.request_hash); NULL for the requests
    # backfilled from ad_accounts.request_id, made before their content was recorded.
    request_hash: bytes | None = Field(default=None, sa_column=sa.Column(sa.LargeBinary, nullable=True))
    create_time: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))
