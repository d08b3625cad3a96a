"""Protobuf messages to the service's own types (domain), and rows back to protobuf.

Every check on caller input happens here, with domain's rules (but a page token's, in
page_tokens), so the repository only ever sees values that are already well formed;
each failure names the offending field in a google.rpc.BadRequest field violation.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, cast

from adaccounts.v1 import ad_accounts_pb2 as pb
from google.protobuf import timestamp_pb2

from . import models
from .domain import (
    DEFAULT_PAGE_SIZE,
    IMMUTABLE_FIELDS,
    MAX_BATCH,
    MAX_PAGE_SIZE,
    MUTABLE_FIELDS,
    ORDERS,
    OUTPUT_ONLY_FIELDS,
    ListFilters,
    NewAccount,
    Update,
    Violations,
    as_utc,
    check_currency_code,
    check_external_id,
    check_name,
    check_time_zone,
    etag_of,
    parse_uuid,
)

# proto enum number <-> model enum, by name: PLATFORM_META <-> Platform.META.
_PLATFORM_IN = {pb.Platform.Value(f"PLATFORM_{p.name}"): p for p in models.Platform}
_STATUS_IN = {pb.Status.Value(f"STATUS_{s.name}"): s for s in models.Status}
_PLATFORM_OUT = {p: cast("pb.Platform", n) for n, p in _PLATFORM_IN.items()}
_STATUS_OUT = {s: cast("pb.Status", n) for n, s in _STATUS_IN.items()}


# --- single values -----------------------------------------------------------------------


def parse_id(value: str, field: str) -> uuid.UUID:
    """A required UUID in canonical hyphenated form (any case)."""
    violations = Violations()
    parsed = parse_uuid(value, field, violations, required=True)
    violations.raise_if_any()
    assert parsed is not None
    return parsed


def _platform(value: int, field: str, violations: Violations) -> models.Platform | None:
    if value == pb.PLATFORM_UNSPECIFIED:
        violations.add(field, "required")
    elif value not in _PLATFORM_IN:
        violations.add(field, f"unknown platform {value}")
    else:
        return _PLATFORM_IN[value]
    return None


def _status(value: int, field: str, violations: Violations, *, required: bool) -> models.Status | None:
    if value == pb.STATUS_UNSPECIFIED:
        if required:
            violations.add(field, "required")
    elif value not in _STATUS_IN:
        violations.add(field, f"unknown status {value}")
    else:
        return _STATUS_IN[value]
    return None


# --- requests ------------------------------------------------------------------------------


def parse_create(request: pb.CreateAdAccountRequest) -> tuple[NewAccount, uuid.UUID | None]:
    """The account to create and the optional request_id; output-only fields are ignored."""
    violations = Violations()
    account = request.ad_account
    if not request.HasField("ad_account"):
        violations.add("ad_account", "required")
    values = {
        "owner_id": parse_uuid(account.owner_id, "ad_account.owner_id", violations, required=True),
        "platform": _platform(account.platform, "ad_account.platform", violations),
        "external_id": check_external_id(account.external_id, "ad_account.external_id", violations),
        "name": check_name(account.name, "ad_account.name", violations),
        "currency_code": check_currency_code(account.currency_code, "ad_account.currency_code", violations),
        "time_zone": check_time_zone(account.time_zone, "ad_account.time_zone", violations),
        "status": _status(account.status, "ad_account.status", violations, required=False) or models.Status.ACTIVE,
    }
    request_id = parse_uuid(request.request_id, "request_id", violations, required=False)
    violations.raise_if_any()
    return NewAccount(**values), request_id  # type: ignore[arg-type]


def parse_update(request: pb.UpdateAdAccountRequest) -> Update:
    """Which account, the etag to check, and the new value of each field in the mask."""
    violations = Violations()
    if not request.HasField("ad_account"):
        violations.add("ad_account", "required")
    account = request.ad_account
    account_id = parse_uuid(account.id, "ad_account.id", violations, required=True)

    paths = list(request.update_mask.paths)
    if not paths:
        # AIP-134: an empty mask means every mutable field the caller set.
        paths = [name for name in MUTABLE_FIELDS if _is_set(account, name)]
        if not paths and request.HasField("ad_account"):
            violations.add(
                "update_mask",
                "nothing to update: set update_mask or at least one of " + ", ".join(MUTABLE_FIELDS),
            )
    elif "*" in paths:
        if paths != ["*"]:
            violations.add("update_mask.paths", '"*" must be the only path')
        paths = list(MUTABLE_FIELDS)

    changes: dict[str, object] = {}
    seen: set[str] = set()
    for index, path in enumerate(paths):  # index: where the caller put it, repeats counted
        if path in seen:
            continue  # a repeated path is checked once
        seen.add(path)
        where = f"ad_account.{path}"
        if path == "name":
            changes[path] = check_name(account.name, where, violations)
        elif path == "currency_code":
            changes[path] = check_currency_code(account.currency_code, where, violations)
        elif path == "time_zone":
            changes[path] = check_time_zone(account.time_zone, where, violations)
        elif path == "status":
            changes[path] = _status(account.status, where, violations, required=True)
        elif path in IMMUTABLE_FIELDS:
            violations.add(f"update_mask.paths[{index}]", f"{path} cannot be changed after creation")
        elif path in OUTPUT_ONLY_FIELDS or path == "*":
            violations.add(f"update_mask.paths[{index}]", f"{path} is output only")
        else:
            violations.add(
                f"update_mask.paths[{index}]",
                f"unknown field {path[:64]!r}; use {', '.join(MUTABLE_FIELDS)} or *",
            )
    violations.raise_if_any()
    assert account_id is not None
    return Update(id=account_id, etag=account.etag, changes=changes)


def _is_set(account: pb.AdAccount, name: str) -> bool:
    value = getattr(account, name)
    return bool(value)


def parse_batch_ids(ids: list[str]) -> list[uuid.UUID]:
    violations = Violations()
    if len(ids) > MAX_BATCH:
        violations.add("ids", f"at most {MAX_BATCH} ids per call (got {len(ids)})")
        violations.raise_if_any()
    parsed = [parse_uuid(value, f"ids[{i}]", violations, required=True) for i, value in enumerate(ids)]
    violations.raise_if_any()
    return parsed  # type: ignore[return-value]


def parse_list(request: pb.ListAdAccountsRequest) -> tuple[ListFilters, int]:
    """The filters and order of a List call, and its effective page size."""
    violations = Violations()
    if request.page_size < 0:
        violations.add("page_size", "must not be negative")
    page_size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    owner_id = parse_uuid(request.owner_id, "owner_id", violations, required=False)
    platforms = [_platform(p, f"platforms[{i}]", violations) for i, p in enumerate(request.platforms)]
    statuses = [_status(s, f"statuses[{i}]", violations, required=True) for i, s in enumerate(request.statuses)]
    order_by = " ".join(request.order_by.lower().split()) or "create_time"
    if order_by not in ORDERS:
        violations.add("order_by", "must be one of: " + ", ".join(repr(o) for o in ORDERS))
    violations.raise_if_any()
    filters = ListFilters(
        owner_id=owner_id,
        platforms=tuple(dict.fromkeys(platforms)),  # type: ignore[arg-type]
        statuses=tuple(dict.fromkeys(statuses)),  # type: ignore[arg-type]
        order_by=order_by,
    )
    return filters, page_size


# --- rows to messages ----------------------------------------------------------------------


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _set_timestamp(timestamp: timestamp_pb2.Timestamp, moment: datetime) -> None:
    """Timestamp.FromDatetime's result from datetime arithmetic alone (its calendar math in
    Python was ~6 % of a point read's event-loop time), set in place: a Timestamp built apart
    would be copied into its message field (docs/decisions/0010)."""
    elapsed = as_utc(moment) - _EPOCH  # normalised: seconds and microseconds are never negative
    timestamp.seconds = elapsed.days * 86_400 + elapsed.seconds
    timestamp.nanos = elapsed.microseconds * 1000


def to_proto(row: Any) -> pb.AdAccount:
    """From a row of the table (db gives every row the same shape: columns as attributes,
    enums as the models' enums)."""
    account = pb.AdAccount(
        id=str(row.id),
        owner_id=str(row.owner_id),
        platform=_PLATFORM_OUT[row.platform],
        external_id=row.external_id,
        name=row.name,
        currency_code=row.currency_code,
        time_zone=row.time_zone,
        status=_STATUS_OUT[row.status],
        etag=etag_of(row),
    )
    _set_timestamp(account.create_time, row.create_time)
    _set_timestamp(account.update_time, row.update_time)
    return account
