"""A site's register of data subjects' requests, and the deadlines the law sets.

Each request is pseudonymous (a request id, never a name or record id): its
type, the law it falls under, when it was received, the decision and its
ground, when it was decided, and what it did to records and to models. The
register lives at the site (``rights-register.csv``, read by
``fedmeta.data.rights_register``); only counts leave it, suppressed below the
site's minimum cohort size.

Deadlines:

- GDPR Art. 12(3): without undue delay and at the latest one month after
  receipt; extendable by two further months where necessary (``extended``),
  the data subject being told within the first month.
- DPDP Act 2023 s.13(2) with DPDP Rules 2025 r.14(3): grievances answered within
  the period the Data Fiduciary publishes, at most ninety days (secondary source).
"""

from __future__ import annotations

import calendar
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Literal, get_args

RightType = Literal[
    "access",
    "rectification",
    "erasure",
    "restriction",
    "objection",
    "withdrawal",
    "opt-out",
    "portability",
    "grievance",
]
RIGHT_TYPES: tuple[str, ...] = get_args(RightType)
DECISIONS: tuple[str, ...] = ("pending", "granted", "partly-granted", "refused")
LAWS: tuple[str, ...] = ("gdpr", "dpdp")
DPDP_GRIEVANCE_DAYS = 90

DEADLINE_REFERENCES = {
    "gdpr": "GDPR Art. 12(3): one month, extendable by two further months",
    "dpdp": "DPDP Act 2023 s.13(2), DPDP Rules 2025 r.14(3): at most 90 days",
}


def add_months(day: date, months: int) -> date:
    """``day`` plus whole calendar months, clamped to the month's last day."""
    month = day.month - 1 + months
    year, month = day.year + month // 12, month % 12 + 1
    return date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


@dataclass(frozen=True)
class RightsRequest:
    """One data subject's request, as the site recorded it."""

    request_id: str
    type: str
    law: str
    received: date
    decision: str = "pending"
    ground: str | None = None
    decided: date | None = None
    extended: bool = False
    erased_at_source: bool = False
    effect_on_models: str | None = None

    def __post_init__(self) -> None:
        if self.type not in RIGHT_TYPES:
            raise ValueError(f"type: must be one of {', '.join(RIGHT_TYPES)} (got {self.type!r})")
        if self.law not in LAWS:
            raise ValueError(f"law: must be one of {', '.join(LAWS)} (got {self.law!r})")
        if self.decision not in DECISIONS:
            raise ValueError(
                f"decision: must be one of {', '.join(DECISIONS)} (got {self.decision!r})"
            )
        if self.decision != "pending" and self.decided is None:
            raise ValueError("decided: a decided request needs the date of the decision")
        if self.decided is not None and self.decided < self.received:
            raise ValueError("decided: is before received")
        if self.decision in ("refused", "partly-granted") and not self.ground:
            raise ValueError("ground: a refusal must state its ground (e.g. 'GDPR Art. 17(3)(d)')")
        if self.erased_at_source and self.type != "erasure":
            raise ValueError("erased_at_source: only an erasure request erases at source")

    @property
    def deadline(self) -> date:
        """The last day the law allows for the answer."""
        if self.law == "dpdp":
            return self.received + timedelta(days=DPDP_GRIEVANCE_DAYS)
        return add_months(self.received, 3 if self.extended else 1)

    def overdue(self, on: date) -> bool:
        """Answered after its deadline, or still pending after it on ``on``."""
        answered = self.decided if self.decision != "pending" else None
        return (answered or on) > self.deadline


@dataclass(frozen=True)
class RegisterSummary:
    """Counts of one site's register on a date (not yet suppressed)."""

    by_type_decision: dict[tuple[str, str], int]
    overdue: int
    pending: int
    erased_at_source: int
    erasure_requests: int


def summarise(requests: Iterable[RightsRequest], on: date) -> RegisterSummary:
    counts: dict[tuple[str, str], int] = {}
    overdue = pending = erased = erasures = 0
    for r in requests:
        counts[(r.type, r.decision)] = counts.get((r.type, r.decision), 0) + 1
        overdue += r.overdue(on)
        pending += r.decision == "pending"
        erased += r.erased_at_source
        erasures += r.type == "erasure"
    return RegisterSummary(dict(sorted(counts.items())), overdue, pending, erased, erasures)
