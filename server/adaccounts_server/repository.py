"""Every query the service runs.

Each statement is built once (SQLAlchemy Core on the table) and run by `db`: reads
in one round trip outside any transaction, writes in one transaction each.
Methods take validated values (see convert) and return rows; they raise the
domain errors of `errors` for outcomes a caller must hear about.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

import sqlalchemy as sa

from .db import AnyOf, CallScope, Database, Row, Transaction, UniqueViolation
from .domain import ListFilters, NewAccount, Update, as_utc, etag_of
from .errors import Aborted, AlreadyExists, InvalidArgument, NotFound
from .models import AdAccount, AdAccountRequest
from .page_tokens import Position

TABLE = AdAccount.__table__
T = TABLE.c  # columns, for building queries
REQUESTS = AdAccountRequest.__table__
R = REQUESTS.c

# Statements built once: each is compiled once and reused.
_GET = sa.select(TABLE).where(T.id == sa.bindparam("id"))
_BATCH_GET = sa.select(TABLE).where(AnyOf(T.id, "ids"))
# A request id's record and the account it created as it is now (the account's columns all
# NULL once it was deleted).
_REQUEST = (
    sa.select(R.account_id.label("request_account_id"), R.request_hash, *TABLE.c)
    .select_from(REQUESTS.outerjoin(TABLE, T.id == R.account_id))
    .where(R.request_id == sa.bindparam("request_id"))
)
# A request made by a release before ad_account_requests (a rolling deploy's old pods), known
# only by the account it created.
_BY_REQUEST_ID = sa.select(TABLE).where(T.request_id == sa.bindparam("request_id"))
_BY_EXTERNAL_ID = sa.select(T.id).where(
    T.platform == sa.bindparam("platform"), T.external_id == sa.bindparam("external_id")
)
_INSERT = sa.insert(TABLE).returning(*TABLE.c)
_INSERT_REQUEST = sa.insert(REQUESTS)
# Forgetting: the oldest requests past the retention, a batch at a time; SKIP LOCKED so that
# several replicas forgetting at once share the work instead of queueing on each other's rows
# (SQLite, one connection, has no such clause and needs none).
_FORGET_BATCH = 1000
_FORGET = (
    sa.delete(REQUESTS)
    .where(
        R.request_id.in_(
            sa.select(R.request_id)
            .where(R.create_time < sa.bindparam("older_than"))
            .order_by(R.create_time)
            .limit(sa.bindparam("limit"))
            .with_for_update(skip_locked=True)
        )
    )
    .returning(R.request_id)
)
_FORGET_IN_ACCOUNTS = sa.update(TABLE).where(AnyOf(T.request_id, "request_ids")).values(request_id=sa.null())
_LOCK = sa.select(TABLE).where(T.id == sa.bindparam("id")).with_for_update()
# Bound as set_<column> (SQLAlchemy reserves the columns' own names in SET).
_SETS = ("name", "currency_code", "time_zone", "status", "version", "update_time")
_UPDATE = (
    sa.update(TABLE)
    .where(T.id == sa.bindparam("account_id"))
    .values({name: sa.bindparam(f"set_{name}") for name in _SETS})
    .returning(*TABLE.c)
)
_DELETE = sa.delete(TABLE).where(T.id == sa.bindparam("id"))

# order_by -> (sort column, descending?). Ties are broken by id in the same direction,
# so (key, id) is a total order and the keyset position is exact.
_ORDERS: dict[str, tuple[sa.Column[Any], bool]] = {
    "create_time": (T.create_time, False),
    "create_time desc": (T.create_time, True),
    "update_time desc": (T.update_time, True),
    "name": (T.name, False),
    "name desc": (T.name, True),
}

_MISSING_IDS_SHOWN = 10


@cache
def _list_statement(order_by: str, by_owner: bool, by_platform: bool, by_status: bool, after: bool) -> sa.Select[Any]:
    """One List query per combination of filters (a few dozen at most), each built once."""
    key_column, descending = _ORDERS[order_by]
    query = sa.select(TABLE)
    if by_owner:
        query = query.where(T.owner_id == sa.bindparam("owner_id"))
    if by_platform:
        query = query.where(AnyOf(T.platform, "platforms"))
    if by_status:
        query = query.where(AnyOf(T.status, "statuses"))
    if after:
        row_value = sa.tuple_(key_column, T.id)
        bound = sa.tuple_(sa.bindparam("after_key", type_=key_column.type), sa.bindparam("after_id", type_=T.id.type))
        query = query.where(row_value < bound if descending else row_value > bound)
    if descending:
        query = query.order_by(key_column.desc(), T.id.desc())
    else:
        query = query.order_by(key_column.asc(), T.id.asc())
    return query.limit(sa.bindparam("limit"))


def _found(account_id: uuid.UUID, rows: Sequence[Row]) -> Row:
    if not rows:
        raise NotFound(f"ad account {account_id} not found")
    return rows[0]


def _in_order(ids: Sequence[uuid.UUID], rows: Sequence[Row]) -> list[Row]:
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

    async def get(self, account_id: uuid.UUID, scope: CallScope) -> Row:
        return _found(account_id, await self._db.read(_GET, {"id": account_id}, scope))

    async def batch_get(self, ids: Sequence[uuid.UUID], scope: CallScope) -> list[Row]:
        """The rows in the order of `ids`; NOT_FOUND naming every id that does not exist."""
        if not ids:
            return []
        return _in_order(ids, await self._db.read(_BATCH_GET, {"ids": list(set(ids))}, scope))

    async def list(
        self, filters: ListFilters, page_size: int, after: Position | None, scope: CallScope
    ) -> tuple[Sequence[Row], Position | None]:
        """One page in the requested order, starting after `after`; and the position of the
        page's last row when more rows follow (keyset pagination: no OFFSET)."""
        key_column, _ = _ORDERS[filters.order_by]
        parameters: dict[str, Any] = {"limit": page_size + 1}
        if filters.owner_id is not None:
            parameters["owner_id"] = filters.owner_id
        if filters.platforms:
            parameters["platforms"] = list(filters.platforms)
        if filters.statuses:
            parameters["statuses"] = list(filters.statuses)
        if after is not None:
            # Decoded and checked for this order by page_tokens: an aware datetime or a name, a UUID.
            parameters["after_key"] = after.key
            parameters["after_id"] = after.id
        query = _list_statement(
            filters.order_by,
            "owner_id" in parameters,
            "platforms" in parameters,
            "statuses" in parameters,
            after is not None,
        )
        rows = await self._db.read(query, parameters, scope)
        if len(rows) <= page_size:
            return rows, None
        rows = rows[:page_size]
        last_key = getattr(rows[-1], key_column.name)
        return rows, Position(as_utc(last_key) if isinstance(last_key, datetime) else last_key, rows[-1].id)

    async def create(self, new: NewAccount, request_id: uuid.UUID | None, scope: CallScope) -> Row:
        """Insert the account. With a request_id already used (AIP-155): the account that request
        created as it is now, NOT_FOUND if it was deleted since (it is never created again), or
        INVALID_ARGUMENT if the request_id came with a different request."""
        request_hash = new.request_hash() if request_id is not None else None
        if request_id is not None:
            rows = await self._db.fetch(_REQUEST, {"request_id": request_id}, scope)
            if rows:
                return _answer_retry(rows[0], request_hash)
        now = _now()
        values = {
            "id": uuid.uuid4(),
            "owner_id": new.owner_id,
            "platform": new.platform,
            "external_id": new.external_id,
            "name": new.name,
            "currency_code": new.currency_code,
            "time_zone": new.time_zone,
            "status": new.status,
            "create_time": now,
            "update_time": now,
            "version": 1,
            "request_id": request_id,
        }
        try:
            async with self._db.transaction(scope) as transaction:
                if request_id is not None:
                    # First: a concurrent request with the same id waits here for this one's outcome.
                    await transaction.fetch(
                        _INSERT_REQUEST,
                        {
                            "request_id": request_id,
                            "account_id": values["id"],
                            "request_hash": request_hash,
                            "create_time": now,
                        },
                    )
                (row,) = await transaction.fetch(_INSERT, values)
        except UniqueViolation:
            # Lost a race: the same request_id used concurrently, or the (platform, external_id)
            # pair is taken; or the request_id is that of a request made by an older release.
            if request_id is not None:
                rows = await self._db.fetch(_REQUEST, {"request_id": request_id}, scope)
                if rows:
                    return _answer_retry(rows[0], request_hash)
                existing = await self._db.fetch(_BY_REQUEST_ID, {"request_id": request_id}, scope)
                if existing:
                    return existing[0]
            taken = await self._db.fetch(
                _BY_EXTERNAL_ID, {"platform": new.platform, "external_id": new.external_id}, scope
            )
            if not taken:
                raise
            raise AlreadyExists(
                f"an ad account with platform {new.platform.value} and external_id {new.external_id!r} "
                f"already exists: {taken[0].id}"
            ) from None
        return row

    async def forget_requests(self, older_than: datetime, scope: CallScope | None = None) -> int:
        """Forget the request ids of requests made before `older_than` (REQUEST_ID_RETENTION_S):
        a request_id reused after that creates a new account. A batch per transaction; each also
        clears the ids from ad_accounts.request_id, where older releases look them up and whose
        unique constraint would otherwise refuse the new account. Returns how many were forgotten."""
        scope = scope or CallScope(None)
        forgotten = 0
        while True:
            async with self._db.transaction(scope) as transaction:
                rows = await transaction.fetch(_FORGET, {"older_than": older_than, "limit": _FORGET_BATCH})
                if rows:
                    request_ids = [row.request_id for row in rows]
                    await transaction.fetch(_FORGET_IN_ACCOUNTS, {"request_ids": request_ids})
            forgotten += len(rows)
            if len(rows) < _FORGET_BATCH:
                return forgotten

    async def update(self, update: Update, scope: CallScope) -> Row:
        """Apply the changes under a row lock; an update that changes nothing bumps nothing."""
        async with self._db.transaction(scope) as transaction:
            row = await _locked(transaction, update.id, update.etag)
            changed = {name: value for name, value in update.changes.items() if getattr(row, name) != value}
            if not changed:
                return row
            values = {name: changed.get(name, getattr(row, name)) for name in _SETS}
            # Never move backwards, even if this replica's clock is behind the last writer's.
            values["update_time"] = max(_now(), as_utc(row.update_time) + timedelta(microseconds=1))
            values["version"] = row.version + 1
            parameters = {f"set_{name}": value for name, value in values.items()}
            (updated,) = await transaction.fetch(_UPDATE, {"account_id": update.id, **parameters})
        return updated

    async def delete(self, account_id: uuid.UUID, etag: str, scope: CallScope) -> None:
        async with self._db.transaction(scope) as transaction:
            await _locked(transaction, account_id, etag)
            await transaction.fetch(_DELETE, {"id": account_id})


def _answer_retry(request: Row, request_hash: bytes | None) -> Row:
    """What a request with a request_id already used gets: the account that request created,
    as it is now. A request recorded without its content (before migration 0003) is taken for
    the same request."""
    if request.request_hash is not None and request.request_hash != request_hash:
        raise InvalidArgument.field(
            "request_id", "already used for a different request; send a new request_id for a new account"
        )
    if request.id is None:
        raise NotFound(f"the ad account this request created ({request.request_account_id}) has since been deleted")
    return request


async def _locked(transaction: Transaction, account_id: uuid.UUID, etag: str) -> Row:
    rows = await transaction.fetch(_LOCK, {"id": account_id})
    if not rows:
        raise NotFound(f"ad account {account_id} not found")
    row = rows[0]
    if etag and etag != etag_of(row):
        raise Aborted(
            f"ad account {account_id} has changed since it was read (the etag given is stale); read it again and retry"
        )
    return row


def _now() -> datetime:
    # Microsecond precision: what PostgreSQL stores, so what we return is what we keep.
    return datetime.now(UTC)
