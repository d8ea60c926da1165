"""Apply the rules: the three entry points the server and the nodes call.

- :func:`evaluate_run` (server, before sampling): run-level rules once, then
  every site's site-level rules.
- :func:`evaluate_site` (node, and server per site): the site-level rules of
  the site's packs.
- :func:`evaluate_records` (node, each round): the record-level rules, giving
  which records may be used and how many each rule left out.
- :func:`check_min_sites` (server, each round): enough sites sampled?

The packs applied to a site are ``site.law_packs`` plus "privacy".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

from policies.declarations import RunDeclaration, SiteManifest
from policies.privacy import check_min_sites
from policies.records import RecordMeta, as_utc
from policies.registry import rules_for
from policies.rule import (
    Columns,
    Decision,
    GateRule,
    Level,
    Outcome,
    RecordRule,
    RunRule,
    SiteRule,
)

__all__ = [
    "RecordsVerdict",
    "check_min_sites",
    "eligible_sites",
    "evaluate_records",
    "evaluate_run",
    "evaluate_site",
    "suppress_small_counts",
]


def evaluate_run(
    run: RunDeclaration,
    sites: Sequence[SiteManifest],
    transport: str | None = None,
    today: date | None = None,
) -> list[Decision]:
    """All decisions the server needs before sampling: run-level rules, then each site's,
    then the gates (e.g. the DPIA, GDPR-35) over the sites still eligible.

    ``transport``: "simulation", "tls+supernode-auth" or "insecure" where the caller
    knows it (a gate checks it against the DPIA's scope); ``today``: the date the
    gates check review dates against (default: today, UTC).
    """
    ids = [site.site_id for site in sites]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"site ids must be unique; repeated: {', '.join(duplicates)}")
    packs = {pack for site in sites for pack in site.law_packs}
    decisions: list[Decision] = []
    gates: list[GateRule] = []
    for rule in rules_for(packs, Level.RUN):
        if isinstance(rule, GateRule):
            gates.append(rule)
            continue
        assert isinstance(rule, RunRule)
        decisions.extend(rule.evaluate(run, sites))
    for site in sites:
        decisions.extend(evaluate_site(run, site))
    if gates:
        day = today if today is not None else datetime.now(UTC).date()
        remaining = eligible_sites(decisions, sites)
        for gate in gates:
            decisions.extend(gate.gate(run, remaining, transport, day))
    return decisions


def evaluate_site(
    run: RunDeclaration,
    site: SiteManifest,
    read_columns: Sequence[str] | None = None,
    declared_columns: Sequence[str] | None = None,
) -> list[Decision]:
    """The site-level decisions for one site.

    ``read_columns`` are the feature columns the trainer will read; the
    minimisation rule (GDPR-5-1-c) is checked only when they are given, against
    ``declared_columns`` or else the manifest's ``feature_columns``.
    """
    columns = None
    if read_columns is not None:
        if isinstance(read_columns, str):
            raise TypeError("read_columns must be a sequence of column names, not one string")
        declared = declared_columns if declared_columns is not None else site.feature_columns
        columns = Columns(read=tuple(read_columns), declared=tuple(declared) or None)
    decisions = []
    for rule in rules_for(site.law_packs, Level.SITE):
        assert isinstance(rule, SiteRule)
        decision = rule.evaluate(run, site, columns)
        if decision is not None:
            decisions.append(decision)
    return decisions


@dataclass(frozen=True)
class RecordsVerdict:
    """Which of a site's records may be used in a round, and why the others may not.

    ``allowed_mask[i]`` says whether ``records[i]`` may be used. ``excluded_by_rule``
    counts each excluded record once, under the first rule (in registry order)
    that excludes it; it lists every rule that applied, with 0 if it excluded
    nothing. The mask stays on the node: each decision's ``to_dict`` has counts only.
    """

    site_id: str
    allowed_mask: tuple[bool, ...] = field(repr=False)
    decisions: list[Decision]
    excluded_by_rule: dict[str, int]

    @property
    def n_total(self) -> int:
        return len(self.allowed_mask)

    @property
    def n_allowed(self) -> int:
        return sum(self.allowed_mask)

    @property
    def n_excluded(self) -> int:
        return self.n_total - self.n_allowed


def evaluate_records(
    run: RunDeclaration, site: SiteManifest, records: Sequence[RecordMeta], at: datetime
) -> RecordsVerdict:
    """Apply the record-level rules of the site's packs to its records for a round at ``at``.

    O(number of records x number of rules). A record excluded by several rules is
    counted under the first in registry order; each rule's decision also holds,
    locally, the mask of every record it excludes.
    """
    at_utc = as_utc(at)
    assert at_utc is not None
    n = len(records)
    allowed = [True] * n
    excluded_by_rule: dict[str, int] = {}
    decisions: list[Decision] = []
    for rule in rules_for(site.law_packs, Level.RECORD):
        assert isinstance(rule, RecordRule)
        if not rule.applies(run, site):
            decisions.append(
                rule.allow(f"not applicable: applies only when {rule.applies_when}", site)
            )
            continue
        mask = tuple(rule.excludes(record, run, site, at_utc) for record in records)
        first = 0
        for i, excluded in enumerate(mask):
            if excluded and allowed[i]:
                allowed[i] = False
                first += 1
        matched = sum(mask)
        excluded_by_rule[rule.id] = first
        if matched == 0:
            decisions.append(rule.allow(f"no record excluded of {n}", site))
            continue
        earlier = (
            f"; {matched - first} more already excluded by an earlier rule"
            if matched > first
            else ""
        )
        decisions.append(
            rule.decision(
                Outcome.ALLOW_WITH_EXCLUSIONS,
                f"{first} of {n} record(s) excluded: {rule.excluded_because}{earlier}",
                site,
                exclusions={rule.id: first},
                excluded_mask=mask,
            )
        )
    return RecordsVerdict(
        site_id=site.site_id,
        allowed_mask=tuple(allowed),
        decisions=decisions,
        excluded_by_rule=excluded_by_rule,
    )


def eligible_sites(
    decisions: Sequence[Decision], sites: Sequence[SiteManifest]
) -> list[SiteManifest]:
    """The sites no decision denies; none if a decision denies the run itself."""
    if any(d.denied and d.site_id is None for d in decisions):
        return []
    denied = {d.site_id for d in decisions if d.denied}
    return [site for site in sites if site.site_id not in denied]


def suppress_small_counts(counts: Mapping[str, int], min_cohort_size: int) -> dict[str, int | str]:
    """Counts for a report: a count from 1 to min_cohort_size - 1 becomes "<min_cohort_size"."""
    return {
        key: (f"<{min_cohort_size}" if 0 < value < min_cohort_size else value)
        for key, value in counts.items()
    }
