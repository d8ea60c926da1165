"""Builders shared by the policy tests (imported by name: tests/policies is on sys.path)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

from policies import (
    RULES,
    Decision,
    RecordMeta,
    RunDeclaration,
    SiteManifest,
    evaluate_records,
    example_run_declaration,
    example_site_manifest,
)
from policies.rule import Columns, GateRule, Level

AT = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
"""The time of the round the tests evaluate."""

RESEARCH = "research.model-training"

_ids = itertools.count()


def make_run(**changes: Any) -> RunDeclaration:
    """The example run declaration with some fields changed (and re-validated)."""
    data = example_run_declaration().model_dump()
    data.update(changes)
    return RunDeclaration.model_validate(data)


def make_site(name: str = "site", **changes: Any) -> SiteManifest:
    """An example site manifest ("site": DE/GDPR, "site-in": IN/DPDP), changed, re-validated."""
    data = example_site_manifest(name).model_dump()
    data.update(changes)
    return SiteManifest.model_validate(data)


def record(**fields: Any) -> RecordMeta:
    """An adult who consented to research, collected a month before AT; override any field."""
    values: dict[str, Any] = {
        "record_id": f"r{next(_ids)}",
        "consented_purposes": {RESEARCH},
        "age": 40,
        "collected_at": AT - timedelta(days=30),
    }
    values.update(fields)
    return RecordMeta(**values)


def decide(
    rule_id: str,
    run: RunDeclaration,
    site: SiteManifest,
    *,
    sites: list[SiteManifest] | None = None,
    records: list[RecordMeta] | None = None,
    read_columns: list[str] | None = None,
) -> Decision:
    """The decision of one rule, about ``site`` where the rule decides per site."""
    rule = RULES[rule_id]
    if isinstance(rule, GateRule):
        gated = rule.gate(run, sites if sites is not None else [site], "simulation", AT.date())
        return gated[0]
    if rule.level in (Level.RUN, Level.ROUND):
        decisions = rule.evaluate(run, sites if sites is not None else [site])  # type: ignore[attr-defined]
        mine = [d for d in decisions if d.site_id in (site.site_id, None)]
        return mine[0]
    if rule.level is Level.SITE:
        columns = None
        if read_columns is not None:
            columns = Columns(read=tuple(read_columns), declared=site.feature_columns or None)
        decision = rule.evaluate(run, site, columns)  # type: ignore[attr-defined]
        assert decision is not None
        return decision
    verdict = evaluate_records(run, site, records or [], AT)
    (decision,) = [d for d in verdict.decisions if d.rule_id == rule_id]
    return decision
