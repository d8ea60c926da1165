"""Country reference data: ISO 3166 codes, the EEA, and GDPR adequacy decisions.

The lists live as TOML files in ``policies/data/`` with the date they were last
checked (``as_of``) and where they come from (``source``); this module only
reads them. To follow a change in the law, edit the data file, not this code.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from datetime import date
from functools import cache
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).parent / "data"


@dataclass(frozen=True)
class Adequacy:
    """One adequacy decision (GDPR Art. 45(3)) for a third country."""

    code: str
    name: str
    partial: bool = False
    scope: str = ""
    note: str = ""


@dataclass(frozen=True)
class AdequacyList:
    """The adequacy decisions in force ``as_of`` a date, and where that comes from."""

    as_of: date
    source: str
    countries: dict[str, Adequacy]


def _read(name: str) -> dict[str, Any]:
    with open(DATA_DIR / name, "rb") as f:
        return tomllib.load(f)


@cache
def iso_countries() -> dict[str, str]:
    """ISO 3166-1 alpha-2 code -> English name."""
    return dict(_read("countries.toml")["countries"])


@cache
def eea_countries() -> frozenset[str]:
    """The EEA: EU Member States (with their territories that have ISO codes of their
    own, such as Réunion or the Åland Islands) plus Iceland, Liechtenstein and Norway."""
    data = _read("eea.toml")
    return frozenset(data["eu"]) | frozenset(data["efta_eea"]) | frozenset(data["eu_territories"])


@cache
def adequacy_list() -> AdequacyList:
    """The adequacy decisions recorded in ``policies/data/adequacy.toml``."""
    data = _read("adequacy.toml")
    countries = {
        code: Adequacy(
            code=code,
            name=entry["name"],
            partial=bool(entry.get("partial", False)),
            scope=entry.get("scope", ""),
            note=entry.get("note", ""),
        )
        for code, entry in data["countries"].items()
    }
    return AdequacyList(as_of=data["as_of"], source=data["source"], countries=countries)


ADEQUACY_STALE_DAYS = 183
"""The report warns when the adequacy list was last checked longer ago than this."""


def adequacy_staleness(on: date) -> str | None:
    """A one-line warning when the adequacy list is more than six months old on ``on``."""
    as_of = adequacy_list().as_of
    age = (on - as_of).days
    if age <= ADEQUACY_STALE_DAYS:
        return None
    return (
        f"the adequacy list (policies/data/adequacy.toml) was last checked on {as_of}, "
        f"{age} days before {on}: check the Commission's decisions and update it"
    )


def is_eea(code: str) -> bool:
    return code in eea_countries()


def country_name(code: str) -> str:
    return iso_countries().get(code, code)
