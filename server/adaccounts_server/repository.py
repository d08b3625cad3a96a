"""Every query the service runs.

Reads are Core statements run by `Database.read()` (one round trip, plain rows:
no ORM identity map or object construction on the hot path); writes use ORM
sessions from `Database.session()`, one real transaction each. Methods take
validated values (see convert) and return rows; they raise the domain errors of
`errors` for outcomes a caller must hear about.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Row
from sqlalchemy.exc import IntegrityError

from .convert import ListFilters, NewAccount, Update, as_utc, etag_of
from .db import CallScope, Database
from .errors import Aborted, AlreadyExists, NotFound
from .models import AdAccount
from .page_tokens import Position

TABLE = AdAccount.__table__
T = TABLE.c  # columns, for building queries

# Statements built once: SQLAlchemy compiles each once and reuses it.
_GET = sa.select(TABLE).where(T.id == sa.bindparam("id"))
_BATCH_GET = sa.select(TABLE).where(T.id.in_(sa.bindparam("ids", expanding=True)))
# The same on PostgreSQL as one constant statement (no IN-list to render per call), for
# the event loop's reads: psycopg2 sends a list of UUIDs as a uuid[] array.
_BATCH_GET_ANY = sa.select(TABLE).where(T.id == sa.any_(sa.bindparam("ids")))

# order_by -> (sort column, descending?). Ties are broken by id in the same direction,
# so (key, id) is a total order and the keyset position is exact.
_ORDERS: dict[str, tuple[sa.Column, bool]] = {
    "create_time": (T.create_time, False),
    "create_time desc": (T.create_time, True),
    "update_time desc": (T.update_time, True),
    "name": (T.name, False),
    "name desc": (T.name, True),
}

_MISSING_IDS_SHOWN = 10


def _found(account_id: uuid.UUID, rows: Sequence[Any]) -> Any:
    if not rows:
        raise NotFound(f"ad account {account_id} not found")
    return rows[0]


def _in_order(ids: Sequence[uuid.UUID], rows: Sequence[Any]) -> list[Any]:
    """`rows` in the order of `ids`; NOT_FOUND naming every id that has no row."""
    by_id = {row.id: row for row in rows}
    missing = list(dict.fromkeys(i for i in ids if i not in by_id))
    if missing:
        shown = ", ".join(str(i) for i in missing[:_MISSING_IDS_SHOWN])
        more = f" and {len(missing) - _MISSING_IDS_SHOWN} more" if len(missing) > _MISSING_IDS_SHOWN else ""
        raise NotFound(f"ad accounts not found: {shown}{more}")
    return [by_id[i] for i in ids]


class AdAccountRepository:
    def __init__(self, database: Database) -> None:
        self._db = database

    def get(self, account_id: uuid.UUID) -> Any:
        """The row (a named tuple of the table's columns, like the other reads' rows)."""
        return _found(account_id, self._db.read(_GET, {"id": account_id}, prebuilt=True))

    @property
    def reads_on_loop(self) -> bool:
        """Whether the *_on_loop() reads may be used (PostgreSQL without tracing)."""
        return self._db.reads_on_loop

    async def get_on_loop(self, account_id: uuid.UUID, scope: CallScope) -> Any:
        """get(), awaited on the event loop instead of run on a worker thread."""
        return _found(account_id, await self._db.read_prebuilt_on_loop(_GET, {"id": account_id}, scope))

    def batch_get(self, ids: Sequence[uuid.UUID]) -> list[Row[Any]]:
        """The rows in the order of `ids`; NOT_FOUND naming every id that does not exist."""
        if not ids:
            return []
        return _in_order(ids, self._db.read(_BATCH_GET, {"ids": list(set(ids))}))

    async def batch_get_on_loop(self, ids: Sequence[uuid.UUID], scope: CallScope) -> list[Any]:
        """batch_get(), awaited on the event loop instead of run on a worker thread."""
        if not ids:
            return []
        return _in_order(ids, await self._db.read_prebuilt_on_loop(_BATCH_GET_ANY, {"ids": list(set(ids))}, scope))

    def list(
        self, filters: ListFilters, page_size: int, after: Position | None
    ) -> tuple[Sequence[Row[Any]], Position | None]:
        """One page in the requested order, starting after `after`; and the position of the
        page's last row when more rows follow (keyset pagination: no OFFSET)."""
        key_column, descending = _ORDERS[filters.order_by]
        query = sa.select(TABLE)
        if filters.owner_id is not None:
            query = query.where(T.owner_id == filters.owner_id)
        if filters.platforms:
            query = query.where(T.platform.in_(filters.platforms))
        if filters.statuses:
            query = query.where(T.status.in_(filters.statuses))
        if after is not None:
            row_value = sa.tuple_(key_column, T.id)
            bound = sa.tuple_(_key_from_token(key_column, after[0]), _id_from_token(after[1]))
            query = query.where(row_value < bound if descending else row_value > bound)
        if descending:
            query = query.order_by(key_column.desc(), T.id.desc())
        else:
            query = query.order_by(key_column.asc(), T.id.asc())
        rows = self._db.read(query.limit(page_size + 1))
        if len(rows) <= page_size:
            return rows, None
        rows = rows[:page_size]
        return rows, (_key_for_token(getattr(rows[-1], key_column.name)), str(rows[-1].id))

    def create(self, new: NewAccount, request_id: uuid.UUID | None) -> AdAccount:
        """Insert the account; with a request_id already used, return what that request created."""
        if request_id is not None:
            existing = self._by_request_id(request_id)
            if existing is not None:
                return existing
        now = _now()
        row = AdAccount(
            id=uuid.uuid4(),
            owner_id=new.owner_id,
            platform=new.platform,
            external_id=new.external_id,
            name=new.name,
            currency_code=new.currency_code,
            time_zone=new.time_zone,
            status=new.status,
            create_time=now,
            update_time=now,
            version=1,
            request_id=request_id,
        )
        try:
            with self._db.session() as session:
                session.add(row)
        except IntegrityError:
            # Lost a race: either the same request retried concurrently, or the
            # (platform, external_id) pair is taken.
            if request_id is not None:
                existing = self._by_request_id(request_id)
                if existing is not None:
                    return existing
            with self._db.session() as session:
                taken = session.scalar(
                    sa.select(T.id).where(T.platform == new.platform, T.external_id == new.external_id)
                )
            if taken is None:
                raise
            raise AlreadyExists(
                f"an ad account with platform {new.platform.value} and external_id {new.external_id!r} "
                f"already exists: {taken}"
            ) from None
        return row

    def update(self, update: Update) -> AdAccount:
        """Apply the changes under a row lock; an update that changes nothing bumps nothing."""
        with self._db.session() as session:
            row = self._locked(session, update.id, update.etag)
            changed = {name: value for name, value in update.changes.items() if getattr(row, name) != value}
            if changed:
                for name, value in changed.items():
                    setattr(row, name, value)
                row.version += 1
                # Never move backwards, even if this replica's clock is behind the last writer's.
                row.update_time = max(_now(), as_utc(row.update_time) + timedelta(microseconds=1))
        return row

    def delete(self, account_id: uuid.UUID, etag: str) -> None:
        with self._db.session() as session:
            row = self._locked(session, account_id, etag)
            session.delete(row)

    def _locked(self, session: sa.orm.Session, account_id: uuid.UUID, etag: str) -> AdAccount:
        row = session.get(AdAccount, account_id, with_for_update=True)
        if row is None:
            raise NotFound(f"ad account {account_id} not found")
        if etag and etag != etag_of(row):
            raise Aborted(
                f"ad account {account_id} has changed since it was read (the etag given is stale); "
                "read it again and retry"
            )
        return row

    def _by_request_id(self, request_id: uuid.UUID) -> AdAccount | None:
        with self._db.session() as session:
            return session.scalar(sa.select(AdAccount).where(T.request_id == request_id))


def _now() -> datetime:
    # Microsecond precision: what PostgreSQL stores, so what we return is what we keep.
    return datetime.now(UTC)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _key_for_token(value: object) -> int | str:
    if isinstance(value, datetime):
        return (as_utc(value) - _EPOCH) // timedelta(microseconds=1)
    return str(value)


def _key_from_token(column: sa.Column, value: int | str) -> object:
    """The sort key a token carries, as the column's type; ValueError if it is not one."""
    if isinstance(column.type, sa.DateTime):
        if not isinstance(value, int):
            raise ValueError("time key expected")
        return _EPOCH + timedelta(microseconds=value)
    if not isinstance(value, str):
        raise ValueError("text key expected")
    return value


def _id_from_token(value: str) -> uuid.UUID:
    return uuid.UUID(value)
