"""The shape of ``metrics.jsonl`` lines and ``summary.json`` as the report reads them.

Fields the report uses must have these types; anything else in the line is
kept as it is. A wrong type is a one-line :class:`ValueError` naming the field,
so a malformed (or hand-edited) file never reaches the report's sections.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    StringConstraints,
)
from pydantic import ValidationError as _ValidationError

from policies.validation import format_validation_error

Number = StrictInt | StrictFloat
Suppressed = Annotated[StrictStr, StringConstraints(pattern=r"^<[0-9]+$")]
"""A count a site released suppressed below its minimum cohort size, e.g. "<5"."""


class _Eval(BaseModel):
    model_config = ConfigDict(extra="allow")

    metric: StrictStr | None = None
    adapted: Number | None = None
    adapted_ci95: Number | None = None
    unadapted: Number | None = None
    episodes: StrictInt | None = None
    shots: StrictInt | None = None
    n_way: StrictInt | None = None


class MetricsLine(BaseModel):
    model_config = ConfigDict(extra="allow")

    round: StrictInt
    run: StrictStr | None = None
    model_sha256: StrictStr | None = None
    beta: Number | None = None
    examples: StrictInt | None = None
    sampled: list[StrictStr] | None = None
    used: list[StrictStr] | None = None
    eligible: list[StrictStr] | None = None
    declined: dict[str, StrictStr] | None = None
    dropped: dict[str, StrictStr] | None = None
    lost: dict[str, StrictStr] | None = None
    denied: dict[str, StrictStr] | None = None
    unusable: dict[str, StrictStr] | None = None
    epsilon: dict[str, Number] | None = None
    epsilon_round: dict[str, Number] | None = None
    dp: dict[str, StrictBool] | None = None
    exclusions: dict[str, dict[str, StrictInt | Suppressed]] | None = None
    receipts: dict[str, StrictStr] | None = None
    eval: _Eval | None = None


class SummaryDoc(BaseModel):
    """``summary.json``: the fields the report reads."""

    model_config = ConfigDict(extra="allow")

    run: StrictStr | None = None
    sites: list[StrictStr] | None = None
    model_sha256: StrictStr | None = None
    audit_head: StrictStr | None = None
    anchors: dict[str, StrictStr] | None = None


def _problem(model: type[BaseModel], doc: Any, whole: str) -> str | None:
    try:
        model.model_validate(doc)
    except _ValidationError as exc:
        return format_validation_error(exc, "", model=model, whole=whole)
    return None


def check_summary(doc: Any) -> str | None:
    """None if ``doc`` is a usable summary, else '<field>: <what is wrong>'."""
    return _problem(SummaryDoc, doc, "(file)")


def check_line(rec: Any) -> str | None:
    """None if ``rec`` is a usable metrics line, else '<field>: <what is wrong>'."""
    return _problem(MetricsLine, rec, "(line)")
