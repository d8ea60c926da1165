"""The data protection impact assessment (GDPR Art. 35) as a versioned record, and the
check that it is approved and still covers the run.

A DPIA is a TOML file (``dpia.toml``, see ``policies/examples/dpia.toml``) that a run
declaration names with ``dpia_file``; the declaration then carries it, so every site
approves (and the report shows) the DPIA version the run relied on. Its ``scope`` says
what was assessed: the sites, countries, purposes, the largest epsilon and the
transports. A run outside that scope makes the DPIA *stale*: the processing changed
after the assessment (Art. 35(11)), and the run is refused until a new version is
approved.

The risk scale is the ICO's: likelihood remote / possible / probable, severity minimal
/ significant / severe; each risk is rated before (inherent) and after the measures
(residual), as the EDPB DPIA template asks.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_serializer,
)

from policies.validation import Country, SiteId, format_validation_error, one_line

Likelihood = Literal["remote", "possible", "probable"]
Severity = Literal["minimal", "significant", "severe"]
DpiaStatus = Literal["draft", "in-review", "approved", "superseded", "withdrawn"]
DpiaDecision = Literal["approve", "approve-with-conditions", "reject", "refer-art-36"]
Transport = Literal["simulation", "tls+supernode-auth", "insecure"]
_Text = Annotated[str, Field(min_length=1, max_length=2000)]

DECISION_WORDS: dict[str, str] = {
    "approve": "approved",
    "approve-with-conditions": "approved with conditions",
    "reject": "rejected",
    "refer-art-36": "referred to the supervisory authority (GDPR Art. 36 prior consultation)",
}
_SCORE = {"remote": 1, "possible": 2, "probable": 3, "minimal": 1, "significant": 2, "severe": 3}


class DpiaError(ValueError):
    """A DPIA file that cannot be read or is not valid (one line, names file and field)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DpiaRisk(_Model):
    """One risk to data subjects, rated before and after the measures against it."""

    id: _Text
    title: _Text
    description: _Text
    likelihood_before: Likelihood
    severity_before: Severity
    measures: tuple[_Text, ...] = Field(min_length=1)
    likelihood_after: Likelihood
    severity_after: Severity

    @staticmethod
    def level(likelihood: str, severity: str) -> str:
        """low / medium / high from likelihood x severity (ICO's matrix)."""
        score = _SCORE[likelihood] * _SCORE[severity]
        return "high" if score >= 6 else "medium" if score >= 3 else "low"

    @property
    def inherent(self) -> str:
        return self.level(self.likelihood_before, self.severity_before)

    @property
    def residual(self) -> str:
        return self.level(self.likelihood_after, self.severity_after)


class DpiaScope(_Model):
    """What the DPIA assessed; anything outside it makes the DPIA stale."""

    sites: tuple[SiteId, ...] = ()
    """The site ids assessed; a site not listed is a new site. Empty: the assessment
    names no sites, and every site is new."""
    countries: frozenset[Country]
    purposes: frozenset[_Text]
    max_epsilon: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = None
    """The largest per-run epsilon assessed; None: only non-private runs were assessed."""
    transports: frozenset[Transport] = frozenset({"tls+supernode-auth"})
    non_private: StrictBool = False
    """Whether runs without differential privacy (``--no-dp``) were assessed too."""

    @field_serializer("countries", "purposes", "transports")
    def _sorted(self, value: frozenset[str]) -> list[str]:
        return sorted(value)  # one canonical form: the declaration is hashed with it


class DpiaRecord(_Model):
    """A versioned DPIA (GDPR Art. 35(7), with the EDPB template's validation part)."""

    id: _Text
    version: Annotated[StrictInt, Field(ge=1)]
    status: DpiaStatus
    title: _Text
    decision: DpiaDecision | None = None
    conditions: tuple[_Text, ...] = ()
    decided_by: _Text | None = None
    decided_on: date | None = None
    dpo_advice: _Text | None = None
    """GDPR Art. 35(2): the DPO's advice, in short."""
    dpo_advice_date: date | None = None
    dpo_advice_followed: StrictBool | None = None
    data_subjects_views: _Text | None = None
    """GDPR Art. 35(9): the views of data subjects or their representatives, or why
    they were not sought."""
    review_date: date
    review_triggers: tuple[_Text, ...] = ()
    scope: DpiaScope
    risks: tuple[DpiaRisk, ...] = Field(min_length=1)

    @property
    def approved(self) -> bool:
        return self.status == "approved" and self.decision in ("approve", "approve-with-conditions")

    def label(self) -> str:
        return f"DPIA {self.id} v{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def stale_reasons(
    dpia: DpiaRecord,
    epsilon: float | None,
    purpose: str,
    sites: Sequence[tuple[str, str]],
    transport: str | None,
    today: date,
) -> list[str]:
    """Why ``dpia`` no longer covers this run (empty: it does).

    ``sites``: (site id, country) of every site that will take part; ``transport``:
    None where the caller does not know it (checked again by whoever does)."""
    out = []
    scope = dpia.scope
    if today > dpia.review_date:
        out.append(f"its review date {dpia.review_date.isoformat()} has passed")
    new_sites = [s for s, _ in sites if s not in scope.sites]
    if new_sites:
        out.append(f"new site(s) not assessed: {', '.join(sorted(new_sites))}")
    new_countries = sorted({c for _, c in sites} - scope.countries)
    if new_countries:
        out.append(f"new country(ies) not assessed: {', '.join(new_countries)}")
    if purpose not in scope.purposes:
        out.append(f"new purpose not assessed: {purpose}")
    if epsilon is not None and (scope.max_epsilon is None or epsilon > scope.max_epsilon):
        assessed = "none" if scope.max_epsilon is None else f"{scope.max_epsilon:g}"
        out.append(f"epsilon {epsilon:g} is higher than the {assessed} assessed")
    if epsilon is None and not scope.non_private:
        out.append("the run is non-private (no differential privacy), which was not assessed")
    if transport is not None and transport not in scope.transports:
        out.append(
            f"transport {transport!r} was not assessed ({', '.join(sorted(scope.transports))})"
        )
    return out


def approval_problems(dpia: DpiaRecord) -> list[str]:
    """Why ``dpia`` is not an approval a run may rely on (empty: it is)."""
    out = []
    if dpia.status != "approved":
        out.append(f"its status is {dpia.status}, not approved")
    if dpia.decision is None:
        out.append("no decision is recorded")
    elif dpia.decision not in ("approve", "approve-with-conditions"):
        out.append(f"it was {DECISION_WORDS[dpia.decision]}")
    if dpia.decision == "approve-with-conditions" and not dpia.conditions:
        out.append("it is approved with conditions but names none")
    if not dpia.dpo_advice or dpia.dpo_advice_date is None:
        out.append("no DPO advice and date are recorded (GDPR Art. 35(2))")
    return out


def parse_dpia(data: Mapping[str, Any], source: str = "<dpia>") -> DpiaRecord:
    """A DPIA from parsed TOML; DpiaError names ``source`` and the field."""
    if not isinstance(data, Mapping):
        raise DpiaError(f"{source}: must be a TOML table of fields")
    try:
        return DpiaRecord.model_validate(dict(data))
    except ValidationError as exc:
        raise DpiaError(
            format_validation_error(exc, source, model=DpiaRecord, whole="dpia", limit=400)
        ) from None


def load_dpia(path: str | Path) -> DpiaRecord:
    """Read and check a ``dpia.toml``."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise DpiaError(f"{path}: DPIA file not found: check dpia_file") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DpiaError(one_line(f"{path}: cannot read the DPIA: {exc}", 400)) from None
    return parse_dpia(data, str(path))
