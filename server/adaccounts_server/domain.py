"""The service's own types, apart from protobuf: what the repository takes, and the rules
every value must meet before it gets there.

convert turns requests into these (naming each offending field in a google.rpc.BadRequest
field violation); the repository only ever sees values that passed the checks here.
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

ORDERS = ("create_time", "create_time desc", "update_time desc", "name", "name desc")
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_BATCH = 1000


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


# --- values -----------------------------------------------------------------------------------


def parse_uuid(value: str, field: str, violations: Violations, *, required: bool) -> uuid.UUID | None:
    """A UUID in canonical hyphenated form (any case); None, with a violation, when it is not."""
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


def check_name(value: str, field: str, violations: Violations) -> str | None:
    if not value:
        violations.add(field, "required")
    elif len(value) > models.NAME_MAX:
        violations.add(field, f"must be at most {models.NAME_MAX} characters (got {len(value)})")
    elif problem := name_problem(value):
        violations.add(field, problem)
    else:
        return value
    return None


def name_problem(value: str) -> str | None:
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


def check_external_id(value: str, field: str, violations: Violations) -> str | None:
    if not value:
        violations.add(field, "required")
    elif len(value) > models.EXTERNAL_ID_MAX:
        violations.add(field, f"must be at most {models.EXTERNAL_ID_MAX} characters (got {len(value)})")
    elif not value.isprintable() or any(c.isspace() for c in value):
        violations.add(field, "must be printable characters without whitespace")
    else:
        return value
    return None


def check_currency_code(value: str, field: str, violations: Violations) -> str | None:
    if not value:
        violations.add(field, "required")
    elif not _CURRENCY.fullmatch(value):
        violations.add(field, "must be an ISO 4217 code: three ASCII letters, like EUR")
    else:
        return value.upper()
    return None


def check_time_zone(value: str, field: str, violations: Violations) -> str | None:
    if not value:
        violations.add(field, "required")
    elif value not in _TIME_ZONES:
        violations.add(field, "must be an IANA time zone name, like Europe/Paris")
    else:
        return value
    return None


# --- what the repository takes --------------------------------------------------------------------


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


@dataclass(frozen=True)
class Update:
    id: uuid.UUID
    etag: str
    changes: dict[str, object] = field(default_factory=dict)


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


def etag_of(row: Any) -> str:
    return str(row.version)


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
