"""Page one of the report and the reading aids: grouped findings, go / no-go, the rule
annex, measures shared by every record, decisions grouped across sites.

Nothing here reads a file: it only rearranges what :mod:`fedmeta.report.build`
assembled, so that ten sites with the same finding read as one line.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence

from fedmeta.report.model import (
    DecisionGroup,
    DecisionRow,
    Finding,
    Measure,
    ProcessingRecord,
    RuleAnnexRow,
    RunSummary,
    SignOff,
    SitePrivacy,
    Summary,
)

TOP = 5
SIGN_OFF = (
    SignOff(
        role="Data protection officer",
        decides="advice given (GDPR Art. 35(2), 39(1)(c)): "
        "accept / accept with conditions / object",
    ),
    SignOff(
        role="Controller (coordinator)",
        decides="residual risk accepted; go / no-go for the next run",
    ),
    SignOff(
        role="Joint controllers (each site)", decides="site's own DPO consulted; conditions met"
    ),
    SignOff(role="Review owner", decides="next review date; what triggers an earlier review"),
)
_RULE_ID = re.compile(r"\s*\(?\b(?:GDPR|DPDP|PRIV|SITE)-[A-Z0-9-]+\b\)?")
_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e-?\d+)?")
_HEX = re.compile(r"\b(?:sha256[: ])?[0-9a-f]{16,}\b")


def report_id(run_id: str, scope: str | None, generated_at: str) -> str:
    """A short id printed on every page: stable for one rendering of one report."""
    digest = hashlib.sha256(f"{run_id}\n{scope or ''}\n{generated_at}".encode()).hexdigest()
    return f"R-{digest[:10]}"


def _site_pattern(site: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![\w-]){re.escape(site)}(?![\w-])")


def _sites_text(sites: Sequence[str]) -> str:
    return ", ".join(sites)


def group_findings(findings: Iterable[Finding], sites: Sequence[str]) -> list[Finding]:
    """Findings that differ only in the one site they name become one finding
    ("3 sites (site-0, site-1, site-2): ..."), at the place of the first of them."""
    patterns = {s: _site_pattern(s) for s in sites}
    groups: dict[tuple[str, str, str], list[tuple[Finding, str | None]]] = {}
    order: list[tuple[str, str, str]] = []
    for f in findings:
        named = [s for s, p in patterns.items() if p.search(f.message)]
        site = named[0] if len(named) == 1 and not f.sites else None
        template = patterns[site].sub("{site}", f.message) if site else f.message
        key = (f.severity, f.section, template if site else f"\0{len(order)}{f.message}")
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append((f, site))
    out = []
    for key in order:
        members = groups[key]
        first = members[0][0]
        if len(members) == 1:
            out.append(first)
            continue
        names = [s for _, s in members if s]
        body = key[2]
        if body.startswith("{site}: "):
            body = body[len("{site}: ") :]
        elif body.startswith("{site} "):
            body = "each " + body[len("{site} ") :]
        body = body.replace("{site}", "each site")
        out.append(
            Finding(
                severity=first.severity,
                section=first.section,
                message=f"{len(names)} sites ({_sites_text(names)}): {body}",
                sites=names,
            )
        )
    return out


_PLAIN: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"intact only under (?:a key|keys) taken from the run directory"),
        "The audit logs were checked only against keys found in the run directory itself: "
        "have the parties' keys confirmed independently (fedmeta report --trust).",
    ),
    (
        re.compile(r"private signing key\(s\) are inside the run directory"),
        "Private signing keys are stored in the run directory: whoever holds it could rewrite "
        "the logs. Move them out before the directory is archived or shared.",
    ),
    (
        re.compile(r"differential privacy was OFF"),
        "Differential privacy was off: nothing limits what the model updates reveal about "
        "patients.",
    ),
    (
        re.compile(r"erasure requests handled"),
        "Erasure requests were honoured only from the next round on: models trained earlier "
        "still reflect those records. Record the Art. 17(3)(d) exemption or decide to retrain.",
    ),
    (
        re.compile(r"not named among the run's controllers"),
        "Some hospitals act as joint controllers but are not named in the run's joint-controller "
        "arrangement (Art. 26): add them or correct their role.",
    ),
    (re.compile(r"names no DPO contact"), ""),
    (
        re.compile(r"no DPIA id is declared"),
        "No data protection impact assessment is attached to this run.",
    ),
    (re.compile(r"DPIA"), ""),
    (re.compile(r"adequacy"), ""),
    (
        re.compile(r"final_model.pt is stored unencrypted"),
        "The final model is stored unencrypted at the coordinator.",
    ),
)


def plain(f: Finding) -> str:
    """A finding in plain words for page one: a fixed sentence for the common kinds,
    else the message without rule ids and hashes."""
    for pattern, text in _PLAIN:
        if pattern.search(f.message):
            if text:
                prefix = f"{len(f.sites)} sites: " if f.sites else ""
                return prefix + text
            break
    message = _HEX.sub("…", _RULE_ID.sub("", f.message)).strip()
    return message if len(message) <= 240 else message[:237].rstrip() + "..."


def summary(
    run: RunSummary,
    findings: Sequence[Finding],
    privacy: Sequence[SitePrivacy],
    checks_passed: bool,
    dpia_line: str,
    gate_refusals: Sequence[str] = (),
) -> Summary:
    """Page one: the verdict, key facts, the top findings in plain words, the sign-off."""
    errors = [f for f in findings if f.severity == "error"]
    warnings = [f for f in findings if f.severity == "warning"]
    if errors or not checks_passed or gate_refusals:
        verdict = "NO-GO"
        why = (
            "the evidence did not verify"
            if not checks_passed
            else f"{len(errors)} error(s) must be resolved first"
            if errors
            else "a gate refused the run: " + gate_refusals[0]
        )
    elif warnings:
        verdict, why = (
            "GO WITH CONDITIONS",
            (f"{len(warnings)} warning(s) need a person's decision; see the findings"),
        )
    else:
        verdict, why = "GO", "no error or warning was found"
    eps = [p.epsilon_run for p in privacy if p.dp and p.epsilon_run is not None]
    facts = [
        f"Purpose: {run.purpose_description} ({run.purpose})",
        f"Sites: {run.sites_configured} configured"
        + (
            f", {run.sites_eligible} took part, {run.sites_denied} refused"
            if run.sites_eligible is not None
            else ""
        ),
        f"Rounds: {run.rounds_run} of {run.rounds_planned}"
        + (f"; stopped: {run.stopped}" if run.stopped else ""),
        (
            "Differential privacy: on at every site; epsilon this run "
            + (f"{min(eps):.3g} to {max(eps):.3g}" if eps else "-")
            + (
                f" (declared at most {run.declared_epsilon:g}, delta {run.declared_delta:g})"
                if run.declared_epsilon is not None and run.declared_delta is not None
                else ""
            )
        )
        if run.dp
        else "Differential privacy: OFF",
        f"DPIA: {dpia_line}",
    ]
    ordered = [*errors, *warnings, *[f for f in findings if f.severity == "info"]]
    top: list[str] = []
    for f in ordered:
        text = plain(f)
        if text not in top:
            top.append(text)
        if len(top) == TOP:
            break
    return Summary(
        verdict=verdict,
        why=why,
        facts=facts,
        top_findings=top,
        more_findings=max(0, len(findings) - len(top)),
        sign_off=list(SIGN_OFF),
    )


def shared_measures(records: Sequence[ProcessingRecord]) -> list[Measure]:
    """The measures every site's record of processing holds identically (shown once)."""
    sites = [r for r in records if r.party.site_id is not None]
    if len(sites) < 2:
        return []
    return [m for m in sites[0].measures if all(m in r.measures for r in sites[1:])]


def group_decisions(rows: Iterable[DecisionRow]) -> list[DecisionGroup]:
    """Site decisions equal but for the site (and the rounds it took part in), shown once
    with the sites listed; ``rounds`` is then every round any of them logged it."""
    groups: dict[tuple, DecisionGroup] = {}
    for d in rows:
        key = (d.rule_id, d.outcome, tuple(d.references), d.reason, tuple(d.flags), d.legal_status)
        g = groups.get(key)
        site = d.site_id or "run"
        if g is None:
            groups[key] = DecisionGroup(
                rule_id=d.rule_id,
                outcome=d.outcome,
                sites=[site],
                rounds=list(d.rounds),
                references=list(d.references),
                reason=d.reason,
                flags=list(d.flags),
                legal_status=d.legal_status,
            )
        else:
            groups[key] = g.model_copy(
                update={
                    "sites": [*g.sites, site] if site not in g.sites else g.sites,
                    "rounds": sorted({*g.rounds, *d.rounds}),
                }
            )
    return list(groups.values())


def rule_annex(status: object) -> list[RuleAnnexRow]:
    """Every rule fedmeta applies, with its provision, check and status on the report date.

    ``status``: references -> legal status text (the report date's)."""
    from fedmeta.report.policy import EXTRA_RULES
    from policies import RULES

    rows = []
    for rule in RULES.values():
        rows.append(
            RuleAnnexRow(
                rule_id=rule.id,
                pack=rule.pack,
                level=rule.level.value,
                references=list(rule.references),
                checks=rule.description,
                interpretation="(interpretation)" in rule.description or "U" in rule.confidence,
                confidence=rule.confidence or "-",
                legal_status=status(rule.references),
            )
        )  # type: ignore[operator]
    for rule_id, (refs, text) in EXTRA_RULES.items():
        rows.append(
            RuleAnnexRow(
                rule_id=rule_id,
                pack="privacy",
                level="round",
                references=list(refs),
                checks=text,
                interpretation="(interpretation)" in text,
                confidence="-",
                legal_status=status(refs),
            )
        )  # type: ignore[operator]
    return rows


def _join(values: Iterable[str], sep: str = "; ") -> str:
    values = [str(v) for v in values]
    return sep.join(values) if values else "-"


def record_fields(rec: ProcessingRecord, shared: Sequence[Measure]) -> dict[str, str]:
    """A record of processing's Art. 30 fields as text (party, country and contact apart)."""
    served = (
        f"; controllers served (Art. 30(2)(a)): {_join(rec.controllers_served)}"
        if rec.controllers_served
        else ""
    )
    categories = (
        f"; categories of processing (Art. 30(2)(b)): {_join(rec.processing_categories)}"
        if rec.processing_categories
        else ""
    )
    data = ", ".join(
        c.category + (" (special category, Art. 9(1))" if c.special else "")
        for c in rec.data_categories
    )
    transfers = (
        _join(
            f"{t.data}: {t.origin} → {t.destination}, {t.decision}"
            + (f" ({t.rule_id})" if t.rule_id else "")
            + f": {t.ground}"
            for t in rec.transfers
        )
        if rec.transfers
        else "none"
    )
    retention = _join(
        f"{x.item}: "
        + (f"{x.days} days" if x.days is not None else "not declared")
        + f" ({x.held_by}; {x.source})"
        for x in rec.retention
    )
    own = [m for m in rec.measures if m not in shared]
    return {
        "Contact; DPO": f"{rec.party.contact or 'not declared'}; DPO "
        f"{rec.party.dpo or 'not declared'}",
        "(a) Joint controllers; representative": f"joint controllers: "
        f"{_join(rec.joint_controllers)}; representative: {rec.representative}{served}",
        "(b) Purposes; legal basis": f"{_join(rec.purposes)}; legal basis: "
        f"{_join(rec.legal_basis)}{categories}",
        "(c) Data subjects; personal data": f"{_join(rec.data_subjects, ', ')}; {data}",
        "(d) Recipients": _join(rec.recipients),
        "(e) Transfers and safeguards": transfers,
        "(f) Retention": retention,
        "Legal entity; agreements on file": f"{rec.entity_id or 'not in a party registry'}; "
        + (_join(rec.documents) if rec.documents else "no document on file"),
        "(g) Measures (Art. 32(1))": (
            "the shared measures" + ("; " if own else "") if shared else ""
        )
        + _join((f"{m.measure}: {m.status}; {m.detail}" for m in own), "; ")
        if own or shared
        else "-",
    }


def _figures_masked(text: str) -> str:
    """``text`` with every figure (and list of figures) replaced by one ``#``."""
    return re.sub(r"#(?:, #)*", "#", _NUMBER.sub("#", text))


def site_records_view(
    records: Sequence[ProcessingRecord], shared: Sequence[Measure]
) -> dict[str, object]:
    """The sites' records of processing as one view: the fields every site record has
    alike (shown once) and, per site, the fields that differ."""
    sites = [r for r in records if r.party.site_id is not None]
    fields = [
        {
            k: _site_pattern(str(r.party.site_id)).sub("the site", v)
            for k, v in record_fields(r, shared).items()
        }
        for r in sites
    ]
    labels = list(fields[0]) if fields else []
    same = [label for label in labels if len({f[label] for f in fields}) == 1]
    figures = [
        label
        for label in labels
        if label not in same and len({_figures_masked(f[label]) for f in fields}) == 1
    ]
    differ = [label for label in labels if label not in same and label not in figures]
    shown = [
        (
            label,
            fields[0][label]
            if label in same
            else f"as for {sites[0].party.site_id}: {fields[0][label]} (the figures differ by "
            "site: section 5)",
        )
        for label in labels
        if label not in differ
    ]
    return {
        "records": sites,
        "same": shown if fields else [],
        "differ": differ,
        "rows": [
            (r, {label: f[label] for label in differ}) for r, f in zip(sites, fields, strict=True)
        ],
    }


def group_checks(checks: Sequence[object], sites: Sequence[str]) -> list[dict[str, object]]:
    """Cross-checks that passed alike at several sites, shown once ("10 sites: ...");
    every failed check stays on its own line."""
    patterns = [(s, _site_pattern(s)) for s in sites]
    out: list[dict[str, object]] = []
    index: dict[str, int] = {}
    for c in checks:
        name, ok, detail = c.check, c.ok, c.detail  # type: ignore[attr-defined]
        named = [s for s, p in patterns if p.search(name)]
        if not ok or len(named) != 1:
            out.append({"check": name, "ok": ok, "detail": detail, "sites": []})
            continue
        key = dict(patterns)[named[0]].sub("{site}", name)
        if key in index:
            row = out[index[key]]
            row["sites"].append(named[0])  # type: ignore[attr-defined]
            row["details"].append(detail)  # type: ignore[attr-defined]
            continue
        index[key] = len(out)
        out.append(
            {
                "check": name,
                "template": key,
                "ok": True,
                "detail": detail,
                "sites": [named[0]],
                "details": [detail],
            }
        )
    for row in out:
        members = row.get("sites") or []
        if len(members) > 1:  # type: ignore[arg-type]
            body = str(row["template"]).replace("{site}: ", "").replace("{site}", "the site")
            row["check"] = f"{len(members)} sites ({', '.join(members)}): {body}"  # type: ignore[arg-type]
            details = row["details"]
            row["detail"] = (
                details[0]
                if len(set(details)) == 1
                else f"{details[0]} (site by site: {'; '.join(details)})"
            )  # type: ignore[index]
    return out
