"""Policy decisions, exclusions by rule, rights handled, and the DPDP section.

Run-level decisions come from ``policy-decisions.json`` (checked against the
server's signed log in :mod:`fedmeta.report.checks`); what each site decided
in each round comes from the site's own signed log. Counts about people are
suppressed below the site's minimum cohort size (``policies.suppress_small_counts``);
a total is withheld when one of its parts is suppressed, so that it cannot be
subtracted back.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from fedmeta.report.collect import RunFiles, SiteFiles
from fedmeta.report.model import (
    Count,
    DecisionRow,
    Decline,
    DpdpSection,
    DpdpSite,
    ExclusionRow,
    ExclusionTotal,
    PolicySection,
    RightsHandling,
    RightsRegisterRow,
)
from fedmeta.report.rights import register_rows
from policies import RULES, Decision, legal_status, suppress_small_counts
from policies.declarations import DPDP_GROUND_NAMES

DEFAULT_MIN_COHORT = 5
WITHHELD = "withheld"
EXTRA_RULES: dict[str, tuple[tuple[str, ...], str]] = {
    "PRIV-BUDGET": (
        ("GDPR Art. 25(1)", "GDPR Art. 32(1)"),
        "The site's durable privacy ledger refuses a round that would take its "
        "epsilon past its epsilon_max. (interpretation: fedmeta's design)",
    ),
}
ERASURE_RULES = ("GDPR-17", "DPDP-12-3")
CONSENT_RULES = ("GDPR-7-3", "DPDP-6-4")
OTHER_RIGHTS = {"GDPR-21": "objection", "GDPR-18": "restriction", "GDPR-OPT-OUT": "opt-out"}
CHILD_RULES = ("DPDP-9-1", "GDPR-8", "GDPR-MINORS")
DPDP_LOG_MIN_DAYS = 365
DPDP_COMMENCEMENT = (
    "DPDP Act 2023 with the DPDP Rules 2025 (notified 13 Nov 2025): the Act's "
    "s.1(2), s.2, ss.18-26, s.35, ss.38-43 and Rules 1, 2 and 17-21 apply "
    "since notification; s.6(9), s.27(1)(d) and Rule 4 (Consent Managers) from "
    "13 Nov 2026; the Data Fiduciaries' duties (ss.3-17) and Rules 3, 5-16, 22 "
    "and 23 from 13 May 2027."
)


def report_date() -> datetime:
    return datetime.now(UTC)


def status_on_report_date(refs: Iterable[str]) -> str:
    """``binding``, ``readiness (applies from ...)`` or ``partly in force (...)``."""
    return legal_status(tuple(refs), report_date().date()).describe()


def dpdp_in_force() -> str:
    """The DPDP commencement note, with what it means on the report's date."""
    today = report_date().date()
    duties = legal_status(("DPDP Act 2023 s.8(1)",), today)
    now = (
        "the Data Fiduciaries' duties the DPDP rules check are binding"
        if duties.status == "binding"
        else "the Data Fiduciaries' duties the DPDP rules check are NOT yet in force: DPDP "
        "decisions are readiness, not binding law"
    )
    return f"On {today.isoformat()}, {now}. {DPDP_COMMENCEMENT}"


def references(rule_id: str) -> list[str]:
    if rule_id in RULES:
        return list(RULES[rule_id].references)
    return list(EXTRA_RULES.get(rule_id, ((), ""))[0])


def description(rule_id: str) -> str:
    if rule_id in RULES:
        return RULES[rule_id].description
    return EXTRA_RULES.get(rule_id, ((), "(rule not in this fedmeta version)"))[1]


def min_cohort(site: SiteFiles) -> int:
    return site.manifest.min_cohort_size if site.manifest else DEFAULT_MIN_COHORT


def suppress(value: int, k: int) -> Count:
    return suppress_small_counts({"n": int(value)}, k)["n"]


def _row(d: Decision, source: str) -> DecisionRow:
    return DecisionRow(
        rule_id=d.rule_id,
        outcome=d.outcome.value,
        level=d.level.value,
        site_id=d.site_id,
        references=list(d.references),
        reason=d.reason,
        flags=list(d.flags),
        source=source,
        legal_status=status_on_report_date(d.references),
    )


def run_decisions(files: RunFiles, site: str | None) -> list[DecisionRow]:
    return [
        _row(d, "server, before sampling (policy-decisions.json)")
        for d in files.decisions
        if site is None or d.site_id in (None, site)
    ]


def _server_reason(files: RunFiles, rule_id: str, site_id: str) -> str:
    for d in files.decisions:
        if d.rule_id == rule_id and d.site_id == site_id:
            return d.reason
    return ""


def site_decisions(files: RunFiles, site: SiteFiles) -> list[DecisionRow]:
    """The site-level decisions the site logged each round, grouped over rounds."""
    groups: dict[tuple[str, str, tuple[str, ...], str], list[int]] = {}
    for e in site.log.entries:
        if e.run_id != files.run_id or e.round is None:
            continue
        if e.action == "policy.site":
            conflicts = set(str(e.details.get("conflicts") or "").split(","))
            for rule_id in e.rule_ids:
                flags = ("conflict",) if rule_id in conflicts else ()
                reason = (
                    str(e.details.get("reason", ""))
                    if e.decision == "deny"
                    else _server_reason(files, rule_id, site.site_id)
                )
                key = (rule_id, str(e.decision), flags, reason)
                groups.setdefault(key, []).append(e.round)
        elif e.action in ("privacy.decline", "round.decline"):
            for rule_id in e.rule_ids or ("-",):
                key = (rule_id, "deny", (), str(e.details.get("reason", "")))
                groups.setdefault(key, []).append(e.round)
    rows = []
    for (rule_id, outcome, flags, reason), rounds in groups.items():
        level = RULES[rule_id].level.value if rule_id in RULES else "round"
        rows.append(
            DecisionRow(
                rule_id=rule_id,
                outcome=outcome,
                level=level,
                site_id=site.site_id,
                references=references(rule_id),
                reason=reason,
                flags=list(flags),
                source=f"{site.site_id} audit log",
                rounds=sorted(set(rounds)),
                legal_status=status_on_report_date(references(rule_id)),
            )
        )
    return rows


def _records_entries(files: RunFiles, site: SiteFiles) -> list:
    return [
        e
        for e in site.log.entries
        if e.action == "policy.records" and e.run_id == files.run_id and e.round is not None
    ]


def last_counts(files: RunFiles, site: SiteFiles) -> dict[str, int]:
    """Records excluded per rule in the last round the site evaluated its records."""
    entries = _records_entries(files, site)
    return {k: int(v) for k, v in entries[-1].counts.items()} if entries else {}


def exclusions(files: RunFiles, site: SiteFiles) -> list[ExclusionRow]:
    entries = _records_entries(files, site)
    last = last_counts(files, site)
    k = min_cohort(site)
    rules: dict[str, list[int]] = {}
    for e in entries:
        for rule_id, n in e.counts.items():
            if n > 0:
                rules.setdefault(rule_id, []).append(int(e.round))
    return [
        ExclusionRow(
            site_id=site.site_id,
            rule_id=rule_id,
            references=references(rule_id),
            description=description(rule_id),
            count=suppress(last.get(rule_id, 0), k),
            first_round=min(rounds),
            rounds=sorted(set(rounds)),
        )
        for rule_id, rounds in sorted(rules.items())
    ]


def total(parts: Iterable[tuple[int, int]], k: int) -> Count:
    """Sum of (count, site k) parts; withheld if a part is suppressed (secondary suppression)."""
    parts = list(parts)
    whole = sum(n for n, _ in parts)
    if 0 < whole < k:
        return suppress(whole, k)
    if any(0 < n < kk for n, kk in parts):
        return WITHHELD
    return whole


def exclusion_totals(files: RunFiles) -> list[ExclusionTotal]:
    per_rule: dict[str, list[tuple[int, int]]] = {}
    for site in files.sites.values():
        for rule_id, n in last_counts(files, site).items():
            per_rule.setdefault(rule_id, []).append((n, min_cohort(site)))
    k = max([min_cohort(s) for s in files.sites.values()] or [DEFAULT_MIN_COHORT])
    return [
        ExclusionTotal(rule_id=r, references=references(r), count=total(parts, k))
        for r, parts in sorted(per_rule.items())
        if any(n for n, _ in parts)
    ]


def rights(files: RunFiles, site: SiteFiles) -> list[RightsHandling]:
    out = []
    _, register = register_rows(site.site_id, site.dir, min_cohort(site), report_date().date())
    for row in exclusions(files, site):
        if row.rule_id in ERASURE_RULES:
            if register is not None and register.erased_at_source:
                source = (
                    f"erasure at source: the site's register records "
                    f"{register.erased_at_source} of {register.erasure_requests} erasure "
                    "request(s) as erased at source (unsigned)"
                )
            else:
                source = "erasure at source: not evidenced (the site records none)"
            note = (
                f"excluded from training from round {row.first_round} on; {source}; "
                "models trained before the request are not unlearned: record the Art. "
                "17(3)(d) exemption or retrain"
            )
            kind = "erasure"
        elif row.rule_id in CONSENT_RULES:
            note = (
                f"records without consent to this purpose, or whose consent was withdrawn, "
                f"were left out from round {row.first_round} on; processing before a "
                "withdrawal stays lawful (GDPR Art. 7(3), DPDP s.6(5)); the count does not "
                "separate missing from withdrawn consent"
            )
            kind = "consent"
        elif row.rule_id in OTHER_RIGHTS:
            kind = OTHER_RIGHTS[row.rule_id]
            note = (
                f"excluded from training from round {row.first_round} on; refusals and "
                "their grounds are in the site's rights register"
            )
        else:
            continue
        out.append(
            RightsHandling(
                site_id=site.site_id,
                kind=kind,
                rule_id=row.rule_id,
                references=row.references,
                count=row.count,
                excluded_from_round=row.first_round,
                note=note,
            )
        )
    return out


def register_section(sites: list[SiteFiles]) -> tuple[list[RightsRegisterRow], dict[str, Count]]:
    rows: list[RightsRegisterRow] = []
    overdue: dict[str, Count] = {}
    for s in sites:
        site_rows, facts = register_rows(s.site_id, s.dir, min_cohort(s), report_date().date())
        rows += site_rows
        if facts is not None:
            overdue[s.site_id] = facts.overdue
    return rows, overdue


def declines(files: RunFiles, site: SiteFiles) -> list[Decline]:
    return [
        Decline(
            site_id=site.site_id,
            round=int(e.round),
            action=e.action,
            rule_ids=list(e.rule_ids),
            reason=str(e.details.get("reason", "")),
        )
        for e in site.log.entries
        if e.run_id == files.run_id
        and e.round is not None
        and e.decision == "deny"
        and e.action in ("policy.site", "privacy.decline", "round.decline")
    ]


def policy_section(files: RunFiles, site: str | None) -> PolicySection:
    sites = list(files.sites.values())
    denied = {
        d.site_id: f"{d.rule_id} ({'; '.join(d.references)}): {d.reason}"
        for d in files.decisions
        if d.denied and d.site_id and (site is None or d.site_id == site)
    }
    register = register_section(sites)
    records: dict[str, Count] = {}
    for s in sites:
        entries = _records_entries(files, s)
        if entries:
            records[s.site_id] = suppress(
                int(entries[-1].details.get("records") or 0), min_cohort(s)
            )
    return PolicySection(
        min_cohort_size={s.site_id: min_cohort(s) for s in sites},
        run_decisions=run_decisions(files, site),
        site_decisions=[r for s in sites for r in site_decisions(files, s)],
        exclusions=[r for s in sites for r in exclusions(files, s)],
        exclusion_totals=exclusion_totals(files) if site is None else [],
        records_evaluated=records,
        rights=[r for s in sites for r in rights(files, s)],
        rights_register=register[0],
        rights_overdue=register[1],
        declines=[d for s in sites for d in declines(files, s)],
        denied_sites=dict(sorted(denied.items())),
        unusable_sites={
            k: v for k, v in sorted(files.unusable.items()) if site is None or k == site
        },
    )


# ---- DPDP ------------------------------------------------------------------------------------


def _decision(files: RunFiles, rule_id: str, site_id: str) -> Decision | None:
    return next((d for d in files.decisions if d.rule_id == rule_id and d.site_id == site_id), None)


def dpdp_site(files: RunFiles, site: SiteFiles) -> DpdpSite | None:
    m = site.manifest
    if m is None or "dpdp" not in m.law_packs:
        return None
    ground = m.dpdp_ground or "none declared"
    purpose = files.declaration.purpose
    research = None
    if m.dpdp_ground == "17(2)(b)":
        research = (
            f"s.17(2)(b) research exemption claimed for {purpose}: the data must not be "
            "used to take any decision specific to a Data Principal, and the Second "
            "Schedule standards (DPDP Rules 2025 r.16) must be evidenced: not recorded "
            "in the run"
        )
    last = last_counts(files, site)
    k = min_cohort(site)
    # a derived sum: withheld when one of its parts is suppressed, else "<5" + shown part
    # would give the suppressed count away (secondary suppression)
    children_n = total(
        [(last.get(r, 0), k) for r in CHILD_RULES if r in RULES and RULES[r].pack in m.law_packs], k
    )
    minors = (
        "declares minors among its data subjects"
        if m.has_minors
        else "declares no minors among its data subjects"
    )
    children = (
        f"The site {minors}. Records of children (under 18, DPDP s.2(f)) without "
        "verifiable parental consent are left out of every round (DPDP-9-1; GDPR-MINORS "
        "counts them first where GDPR also applies, and PRIV-AGE-UNKNOWN counts records "
        "of unknown age apart); no tracking, behavioural monitoring or "
        "targeted advertising (s.9(3)). The Fourth-Schedule exemption for clinical "
        "establishments is not applied to model training. (interpretation)"
    )
    transfer = _decision(files, "DPDP-16", site.site_id)
    model = _decision(files, "GDPR-44-MODEL", site.site_id)
    transfers = transfer.reason if transfer else "DPDP-16 not evaluated"
    if model is not None:
        transfers += f"; global model to the site: {model.reason}"
    retention = _decision(files, "DPDP-R6-1-e", site.site_id)
    conflict = bool(retention and retention.conflict)
    server_days = files.declaration.log_retention_days
    text = (
        f"site keeps logs {m.log_retention_days} days, server {server_days} days; DPDP Rules "
        f"2025 r.6(1)(e), r.8(3) require at least {DPDP_LOG_MIN_DAYS}"
    )
    if conflict:
        text += (
            "; CONFLICT with the site's GDPR storage-limitation maximum: a person must "
            "decide (not resolved automatically)"
        )
    decisions = [
        _row(d, "server, before sampling (policy-decisions.json)")
        for d in files.decisions
        if d.site_id == site.site_id and d.rule_id in RULES and RULES[d.rule_id].pack == "dpdp"
    ]
    return DpdpSite(
        site_id=site.site_id,
        ground=ground,
        legitimate_use=DPDP_GROUND_NAMES.get(ground, "no DPDP ground declared"),
        research_exemption=research,
        children=children,
        children_excluded=children_n,
        transfers=transfers,
        site_log_retention_days=m.log_retention_days,
        server_log_retention_days=server_days,
        required_log_retention_days=DPDP_LOG_MIN_DAYS,
        log_retention_conflict=conflict,
        log_retention=text,
        decisions=decisions,
    )


def dpdp_section(files: RunFiles) -> DpdpSection | None:
    sites = [d for s in files.sites.values() if (d := dpdp_site(files, s)) is not None]
    return DpdpSection(in_force=dpdp_in_force(), sites=sites) if sites else None
