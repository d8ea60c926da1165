"""When the provisions a rule cites apply: "binding" or "readiness" on a date.

The dates live in ``policies/data/commencement.toml`` with their source. A
rule's decision is *binding* on a date when every provision it cites is in
force then, *readiness* when none is (the site is preparing for a law that does
not yet apply), and *partly in force* otherwise, naming what is not yet in force.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from functools import cache
from pathlib import Path

DATA_FILE = Path(__file__).parent / "data" / "commencement.toml"

BINDING = "binding"
READINESS = "readiness"
PARTLY = "partly in force"


@dataclass(frozen=True)
class Commencement:
    """The commencement data: instrument -> (default date, provision -> date)."""

    as_of: date
    source: str
    instruments: dict[str, tuple[date, dict[str, date]]]


@cache
def commencement_data() -> Commencement:
    with open(DATA_FILE, "rb") as fh:
        data = tomllib.load(fh)
    instruments = {
        name: (entry["default"], {p["ref"]: p["from"] for p in entry.get("provisions", ())})
        for name, entry in data["instruments"].items()
    }
    return Commencement(as_of=data["as_of"], source=data["source"], instruments=instruments)


def in_force_from(reference: str) -> date | None:
    """The date ``reference`` (e.g. "DPDP Act 2023 s.8(7)(a)") applies from; None if unknown."""
    data = commencement_data()
    for name in sorted(data.instruments, key=len, reverse=True):
        if not reference.startswith(name + " "):
            continue
        default, provisions = data.instruments[name]
        provision = reference[len(name) + 1 :]
        matches = [
            (len(ref), start)
            for ref, start in provisions.items()
            if provision == ref or provision.startswith(ref + "(")
        ]
        return max(matches)[1] if matches else default
    return None


@dataclass(frozen=True)
class LegalStatus:
    """Whether the provisions a decision rests on apply on a date."""

    status: str
    """``binding``, ``readiness`` or ``partly in force``."""
    pending: tuple[tuple[str, date], ...] = ()
    """Provisions not yet in force on that date, with the date they apply from."""

    def describe(self) -> str:
        if not self.pending:
            return self.status
        first = min(d for _, d in self.pending)
        return f"{self.status} (applies from {first.isoformat()})"


def legal_status(references: Iterable[str], on: date) -> LegalStatus:
    """The status on ``on`` of a decision citing ``references`` (unknown ones are ignored)."""
    known = [(ref, start) for ref in references if (start := in_force_from(ref)) is not None]
    pending = tuple((ref, start) for ref, start in known if start > on)
    if not pending:
        return LegalStatus(BINDING)
    if len(pending) == len(known):
        return LegalStatus(READINESS, pending)
    return LegalStatus(PARTLY, pending)
