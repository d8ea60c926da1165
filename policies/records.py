"""Per-record metadata the record-level rules read: pseudonymous only.

A :class:`RecordMeta` holds no clinical content and no direct identifier: a
pseudonymous record id, what the data subject consented to and when they
withdrew, their age (or only a minor flag), whether a guardian consented, when
the record was collected, whether erasure was requested, and when the data
subject objected (GDPR Art. 21), had processing restricted (Art. 18) or opted
out under a national opt-out scheme.

Datetimes are compared in UTC; a datetime without a time zone is taken as UTC,
a date as midnight UTC, and ISO 8601 strings are accepted (for CSV columns).
Unknown values are conservative where the law needs them to be: a record whose
age is unknown but whose ``minor`` flag is set is treated as a child.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any


def as_utc(value: Any) -> datetime | None:
    """A timezone-aware UTC datetime from a datetime, date, ISO string or None."""
    if value is None or value == "":
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    raise TypeError(f"expected a datetime, date or ISO 8601 string, got {type(value).__name__}")


def _purposes(value: Any) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        return frozenset(p.strip() for p in value.split(";") if p.strip())
    if isinstance(value, Iterable):
        return frozenset(str(p) for p in value)
    raise TypeError(
        f"consented_purposes: expected a set of purpose ids, got {type(value).__name__}"
    )


def _age(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError("age: expected an integer number of years, got a bool")
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if not value.is_integer():
            raise ValueError(f"age: expected whole years, got {value}")
        value = int(value)
    age = operator.index(value)
    if age < 0 or age > 150:
        raise ValueError(f"age: {age} is not a plausible age in years")
    return age


def _optional_bool(value: Any) -> bool | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return bool(value)


@dataclass(frozen=True, slots=True)
class RecordMeta:
    """Policy-relevant metadata of one record (see the module docstring)."""

    record_id: str
    consented_purposes: frozenset[str] = frozenset()
    consent_withdrawn_at: datetime | None = None
    age: int | None = None
    minor: bool | None = None
    guardian_consent: bool = False
    collected_at: datetime | None = None
    erasure_requested: bool | datetime = False
    objected_at: datetime | None = None
    restricted_at: datetime | None = None
    opted_out_at: datetime | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "record_id", str(self.record_id))
        set_(self, "consented_purposes", _purposes(self.consented_purposes))
        set_(self, "consent_withdrawn_at", as_utc(self.consent_withdrawn_at))
        set_(self, "age", _age(self.age))
        set_(self, "minor", _optional_bool(self.minor))
        set_(self, "guardian_consent", bool(_optional_bool(self.guardian_consent)))
        set_(self, "collected_at", as_utc(self.collected_at))
        for name in ("objected_at", "restricted_at", "opted_out_at"):
            set_(self, name, as_utc(getattr(self, name)))
        erasure = self.erasure_requested
        if erasure is None or isinstance(erasure, bool):
            set_(self, "erasure_requested", bool(erasure))
        else:
            set_(self, "erasure_requested", as_utc(erasure) or False)

    # The questions the record-level rules ask, each answered for a round time `at`.

    def is_child(self, age_limit: int) -> bool:
        """Under ``age_limit`` years; with no age, a set ``minor`` flag counts as a child."""
        if self.age is not None:
            return self.age < age_limit
        return self.minor is True

    def withdrawn_by(self, at: datetime) -> bool:
        """Consent was withdrawn at or before ``at``."""
        return self.consent_withdrawn_at is not None and self.consent_withdrawn_at <= at

    def erasure_due(self, at: datetime) -> bool:
        """Erasure was requested (with no date, or at or before ``at``)."""
        if isinstance(self.erasure_requested, datetime):
            return self.erasure_requested <= at
        return bool(self.erasure_requested)

    def objected_by(self, at: datetime) -> bool:
        """The data subject objected (Art. 21) at or before ``at``."""
        return self.objected_at is not None and self.objected_at <= at

    def restricted_by(self, at: datetime) -> bool:
        """Processing was restricted (Art. 18) at or before ``at`` (lifting clears it)."""
        return self.restricted_at is not None and self.restricted_at <= at

    def opted_out_by(self, at: datetime) -> bool:
        """The data subject opted out under a national scheme at or before ``at``."""
        return self.opted_out_at is not None and self.opted_out_at <= at

    def older_than(self, days: int, at: datetime) -> bool:
        """Collected more than ``days`` days before ``at`` (unknown date: False)."""
        return self.collected_at is not None and at - self.collected_at > timedelta(days=days)


RECORD_COLUMNS: tuple[str, ...] = (
    "record_id",
    "consented_purposes",
    "consent_withdrawn_at",
    "age",
    "minor",
    "guardian_consent",
    "collected_at",
    "erasure_requested",
    "objected_at",
    "restricted_at",
    "opted_out_at",
)


def records_from_columns(columns: Mapping[str, Sequence[Any]]) -> list[RecordMeta]:
    """Records from a columnar table: ``{"record_id": [...], "age": [...], ...}``.

    Only ``record_id`` is required; every column must have one value per record.
    Pass plain Python values (``array.tolist()`` for numpy columns). O(n).
    """
    unknown = set(columns) - set(RECORD_COLUMNS)
    if unknown:
        raise ValueError(
            f"unknown record columns {sorted(unknown)}; known: {', '.join(RECORD_COLUMNS)}"
        )
    if "record_id" not in columns:
        raise ValueError("records need a 'record_id' column")
    n = len(columns["record_id"])
    for name, col in columns.items():
        if len(col) != n:
            raise ValueError(f"column {name!r} has {len(col)} values, record_id has {n}")
    names = list(columns)
    return [
        RecordMeta(**dict(zip(names, row, strict=True)))
        for row in zip(*columns.values(), strict=True)
    ]
