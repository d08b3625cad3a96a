"""Protobuf messages to validated values and rows back to protobuf.

Every check on caller input lives here (but a page token's, in page_tokens), so
the repository only ever sees values that are already well formed; each failure
names the offending field in a google.rpc.BadRequest field violation.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
import uuid
import zoneinfo
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from adaccounts.v1 import ad_accounts_pb2 as pb
from google.protobuf import timestamp_pb2

from . import models
from .errors import FieldViolation, InvalidArgument

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_CURRENCY = re.compile(r"[A-Za-z]{3}")


def _iana_time_zones() -> frozenset[str]:
    """Every zone and link name of the IANA tz database, as listed by the tzdata package (a
    dependency, so every replica accepts the same names whatever its host has), less
    "Factory": a placeholder zone ("-00"), not a place. zoneinfo.available_timezones() is not
    that list: it also walks the host's zoneinfo directory, where "localtime" is a link to
    the host's own zone."""
    try:
        names = frozenset(resources.files("tzdata").joinpath("zones").read_text(encoding="utf-8").split())
    except (ModuleNotFoundError, OSError):  # no tzdata package: the host's files, less what is not IANA's
        names = frozenset(zoneinfo.available_timezones()) - {"localtime", "posixrules"}
    return names - {"Factory"}


_TIME_ZONES = _iana_time_zones()

MUTABLE_FIELDS = ("name", "currency_code", "time_zone", "status")
IMMUTABLE_FIELDS = ("owner_id", "platform", "external_id")
OUTPUT_ONLY_FIELDS = ("id", "create_time", "update_time", "etag")

# proto enum number <-> model enum, by name: PLATFORM_META <-> Platform.META.
_PLATFORM_IN = {pb.Platform.Value(f"PLATFORM_{p.name}"): p for p in models.Platform}
_STATUS_IN = {pb.Status.Value(f"STATUS_{s.name}"): s for s in models.Status}
_PLATFORM_OUT = {p: n for n, p in _PLATFORM_IN.items()}
_STATUS_OUT = {s: n for n, s in _STATUS_IN.items()}


# Violations reported per call. The status travels in trailing metadata, which
# gRPC clients refuse past 8-16 KiB: a thousand bad ids must still come back as
# INVALID_ARGUMENT, not as the client's RESOURCE_EXHAUSTED.
MAX_VIOLATIONS = 10


class Violations:
    """Collects the problems with a request so the caller learns them (nearly) all at once."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []
        self.omitted = 0

    def add(self, field: str, description: str) -> None:
        if len(self.items) < MAX_VIOLATIONS:
            self.items.append(FieldViolation(field, description))
        else:
            self.omitted += 1

    def raise_if_any(self) -> None:
        if self.omitted:
            self.items.append(FieldViolation("", f"and {self.omitted} more problems like these"))
            self.omitted = 0
        if self.items:
            raise InvalidArgument(self.items)


# --- single values -----------------------------------------------------------------------


def parse_id(value: str, field: str) -> uuid.UUID:
    """A required UUID in canonical hyphenated form (any case)."""
    violations = Violations()
    parsed = _uuid(value, field, violations, required=True)
    violations.raise_if_any()
    assert parsed is not None
    return parsed


def _uuid(value: str, field: str, violations: Violations, *, required: bool) -> uuid.UUID | None:
    if not value:
        if required:
            violations.add(field, "required")
        return None
    if len(value) != 36 or not _UUID.fullmatch(value):
        violations.add(field, "must be a UUID in canonical form, like 123e4567-e89b-12d3-a456-426614174000")
        return None
    return uuid.UUID(value)


# Unicode's Bidi_Control characters: invisible, they make text display in another order than
# it is stored ("Trojan Source"), so a name could show as something it is not.
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Assigned Default_Ignorable_Code_Points outside category Cf (format): they too render as
# nothing (combining grapheme joiner, Hangul fillers, Khmer inherent vowels, Mongolian free
# variation selectors, variation selectors).
_INVISIBLE = frozenset(
    "\u034f\u115f\u1160\u17b4\u17b5\u180b\u180c\u180d\u180f\u3164\uffa0"
    + "".join(map(chr, range(0xFE00, 0xFE10)))
    + "".join(map(chr, range(0xE0100, 0xE01F0)))
)


def _name(value: str, field: str, violations: Violations) -> str | None:
    if not value:
        violations.add(field, "required")
    elif len(value) > models.NAME_MAX:
        violations.add(field, f"must be at most {models.NAME_MAX} characters (got {len(value)})")
    elif problem := _name_problem(value):
        violations.add(field, problem)
    else:
        return value
    return None


def _name_problem(value: str) -> str | None:
    """What is wrong with a name of the right length, if anything."""
    categories = [unicodedata.category(c) for c in value]
    if "Cc" in categories:
        return "must not contain control characters"
    if "Zl" in categories or "Zp" in categories:
        return "must not contain line or paragraph separators (U+2028, U+2029)"
    if not _BIDI_CONTROLS.isdisjoint(value):
        return "must not contain bidirectional controls (U+202A-U+202E, U+2066-U+2069, U+200E, U+200F, U+061C)"
    if "Cn" in categories:
        return f"must not contain unassigned code points (Unicode {unicodedata.unidata_version})"
    if all(c.isspace() or category == "Cf" or c in _INVISIBLE for c, category in zip(value, categories, strict=True)):
        return "must contain a visible character, not only spaces or invisible characters"
    return None


def _external_id(value: str, field: str, violations: Violations) -> str | None:
    if not value:
        violations.add(field, "required")
    elif len(value) > models.EXTERNAL_ID_MAX:
        violations.add(field, f"must be at most {models.EXTERNAL_ID_MAX} characters (got {len(value)})")
    elif not value.isprintable() or any(c.isspace() for c in value):
        violations.add(field, "must be printable characters without whitespace")
    else:
        return value
    return None


def _currency_code(value: str, field: str, violations: Violations) -> str | None:
    if not value:
        violations.add(field, "required")
    elif not _CURRENCY.fullmatch(value):
        violations.add(field, "must be an ISO 4217 code: three ASCII letters, like EUR")
    else:
        return value.upper()
    return None


def _time_zone(value: str, field: str, violations: Violations) -> str | None:
    if not value:
        violations.add(field, "required")
    elif value not in _TIME_ZONES:
        violations.add(field, "must be an IANA time zone name, like Europe/Paris")
    else:
        return value
    return None


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


@dataclass(frozen=True)
class NewAccount:
    owner_id: uuid.UUID
    platform: models.Platform
    external_id: str
    name: str
    currency_code: str
    time_zone: str
    status: models.Status

    def request_hash(self) -> bytes:
        """SHA-256 of the account to create, in a canonical form: what a request_id is bound to
        (AIP-155). Two requests that create the same account hash the same however they were
        written (an id's case, a currency's case, the default status left out or spelled out);
        any difference in what would be created gives another hash."""
        canonical = json.dumps(
            [
                "adaccounts.v1.CreateAdAccount/1",  # the form's version, should it ever change
                str(self.owner_id),
                self.platform.value,
                self.external_id,
                self.name,
                self.currency_code,
                self.time_zone,
                self.status.value,
            ],
            ensure_ascii=False,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode("utf-8")).digest()


def parse_create(request: pb.CreateAdAccountRequest) -> tuple[NewAccount, uuid.UUID | None]:
    """The account to create and the optional request_id; output-only fields are ignored."""
    violations = Violations()
    account = request.ad_account
    if not request.HasField("ad_account"):
        violations.add("ad_account", "required")
    values = {
        "owner_id": _uuid(account.owner_id, "ad_account.owner_id", violations, required=True),
        "platform": _platform(account.platform, "ad_account.platform", violations),
        "external_id": _external_id(account.external_id, "ad_account.external_id", violations),
        "name": _name(account.name, "ad_account.name", violations),
        "currency_code": _currency_code(account.currency_code, "ad_account.currency_code", violations),
        "time_zone": _time_zone(account.time_zone, "ad_account.time_zone", violations),
        "status": _status(account.status, "ad_account.status", violations, required=False) or models.Status.ACTIVE,
    }
    request_id = _uuid(request.request_id, "request_id", violations, required=False)
    violations.raise_if_any()
    return NewAccount(**values), request_id  # type: ignore[arg-type]


@dataclass(frozen=True)
class Update:
    id: uuid.UUID
    etag: str
    changes: dict[str, object] = field(default_factory=dict)


def parse_update(request: pb.UpdateAdAccountRequest) -> Update:
    """Which account, the etag to check, and the new value of each field in the mask."""
    violations = Violations()
    if not request.HasField("ad_account"):
        violations.add("ad_account", "required")
    account = request.ad_account
    account_id = _uuid(account.id, "ad_account.id", violations, required=True)

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
            changes[path] = _name(account.name, where, violations)
        elif path == "currency_code":
            changes[path] = _currency_code(account.currency_code, where, violations)
        elif path == "time_zone":
            changes[path] = _time_zone(account.time_zone, where, violations)
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


MAX_BATCH = 1000


def parse_batch_ids(ids: list[str]) -> list[uuid.UUID]:
    violations = Violations()
    if len(ids) > MAX_BATCH:
        violations.add("ids", f"at most {MAX_BATCH} ids per call (got {len(ids)})")
        violations.raise_if_any()
    parsed = [_uuid(value, f"ids[{i}]", violations, required=True) for i, value in enumerate(ids)]
    violations.raise_if_any()
    return parsed  # type: ignore[return-value]


@dataclass(frozen=True)
class ListFilters:
    owner_id: uuid.UUID | None
    platforms: tuple[models.Platform, ...]
    statuses: tuple[models.Status, ...]
    order_by: str

    def fingerprint(self) -> str:
        """Canonical text of the filters and order: what a page token is bound to."""
        return "|".join(
            [
                str(self.owner_id or ""),
                ",".join(sorted(p.value for p in self.platforms)),
                ",".join(sorted(s.value for s in self.statuses)),
                self.order_by,
            ]
        )

    @property
    def sorts_by_name(self) -> bool:
        """Whether the sort key is the name; else it is a time (create_time or update_time)."""
        return self.order_by.split()[0] == "name"


ORDERS = ("create_time", "create_time desc", "update_time desc", "name", "name desc")
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def parse_list(request: pb.ListAdAccountsRequest) -> tuple[ListFilters, int]:
    """The filters and order of a List call, and its effective page size."""
    violations = Violations()
    if request.page_size < 0:
        violations.add("page_size", "must not be negative")
    page_size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    owner_id = _uuid(request.owner_id, "owner_id", violations, required=False)
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


def etag_of(row: Any) -> str:
    return str(row.version)


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    """Timestamp.FromDatetime's result from datetime arithmetic alone: its calendar
    math in Python was ~6 % of a point read's event-loop time."""
    elapsed = as_utc(moment) - _EPOCH  # normalised: seconds and microseconds are never negative
    return timestamp_pb2.Timestamp(seconds=elapsed.days * 86_400 + elapsed.seconds, nanos=elapsed.microseconds * 1000)


def to_proto(row: Any) -> pb.AdAccount:
    """From a row of the table (db gives every row the same shape: columns as attributes,
    enums as the models' enums)."""
    return pb.AdAccount(
        id=str(row.id),
        owner_id=str(row.owner_id),
        platform=_PLATFORM_OUT[row.platform],
        external_id=row.external_id,
        name=row.name,
        currency_code=row.currency_code,
        time_zone=row.time_zone,
        status=_STATUS_OUT[row.status],
        create_time=_timestamp(row.create_time),
        update_time=_timestamp(row.update_time),
        etag=etag_of(row),
    )
