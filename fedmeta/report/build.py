"""Assemble the :class:`~fedmeta.report.model.Report` of a run (federation or one site)."""

from __future__ import annotations

from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from fedmeta.report.checks import audit_section
from fedmeta.report.collect import RunFiles, model_file_encrypted, read_run
from fedmeta.report.dpia import dpia, dpia_line
from fedmeta.report.evidence import metrics_signed, signed_manifest_hashes
from fedmeta.report.learning import learning_section
from fedmeta.report.model import (
    AuditSection,
    Finding,
    IncidentRow,
    PolicySection,
    Report,
    RunSummary,
    Scope,
    Severity,
    SitePrivacy,
)
from fedmeta.report.policy import dpdp_section, policy_section, status_on_report_date
from fedmeta.report.privacy import DEFAULT_EPSILON_WARN, privacy_section, with_plain_language
from fedmeta.report.records import parties, records_of_processing, transport
from fedmeta.report.summary import (
    group_decisions,
    group_findings,
    report_id,
    rule_annex,
    shared_measures,
    summary,
)
from fedmeta.report.trust import Anchor
from policies import get_purpose
from policies.countries import adequacy_staleness, is_eea
from policies.parties import registry_findings

DISCLAIMER = (
    "Generated from the run's signed audit logs, privacy ledgers and files. An "
    "engineering aid for the controller and the DPO, not legal advice; rules marked "
    "(interpretation) are fedmeta's reading of the law."
)


class UnverifiedRunError(RuntimeError):
    """An audit log failed verification or the evidence disagrees (one line, names it)."""


def _generator() -> str:
    try:
        return f"fedmeta {version('fedmeta')}"
    except PackageNotFoundError:  # pragma: no cover - the package is installed in practice
        return "fedmeta"


def _entry_time(files: RunFiles, action: str) -> str | None:
    return next((e.time for e in files.server_entries if e.action == action), None)


def signed_stop(files: RunFiles) -> str | None:
    """Why the run stopped early, as the server signed it (run.end, else run.stop)."""
    if files.run_end is not None:
        why = files.run_end.details.get("stopped")
        return str(why) if why else None
    stop = next((e for e in files.server_entries if e.action == "run.stop"), None)
    return str(stop.details.get("reason") or "stopped") if stop is not None else None


def run_summary(files: RunFiles, scope: str | None) -> RunSummary:
    decl = files.declaration
    start = next((dict(e.details) for e in files.server_entries if e.action == "run.start"), {})
    purpose = get_purpose(decl.purpose)
    denied = {d.site_id for d in files.decisions if d.denied and d.site_id}
    return RunSummary(
        run_id=files.run_id,
        purpose=purpose.id,
        purpose_description=purpose.description,
        task=files.config.task,
        strategy=files.config.strategy,
        rounds_planned=files.config.rounds,
        rounds_run=sum(1 for m in files.round_lines if m.get("used")),
        sites_configured=files.config.sites,
        sites_eligible=len(files.eligible) if scope is None else None,
        sites_denied=len(denied) if scope is None else None,
        started_at=_entry_time(files, "run.start"),
        ended_at=_entry_time(files, "run.end"),
        model_sha256=files.run_end.model_out if files.run_end is not None else None,
        dp=files.config.dp,
        declared_epsilon=decl.epsilon if decl.dp_enabled else None,
        declared_delta=decl.delta if decl.dp_enabled else None,
        stopped=signed_stop(files),
        transport=transport(files),
        config_sha256=start.get("config_sha256"),
        declaration_sha256=start.get("declaration_sha256"),
        declaration_id=decl.run_id,
        dpia_id=decl.dpia_id,
    )


def verification_problem(audit: AuditSection) -> str | None:
    """One line naming the first log that failed (or the first disagreeing evidence)."""
    for log in audit.logs:
        if log.status == "failed":
            return f"audit log {log.log} failed verification: {log.problem}"
    bad = [c for c in audit.cross_checks if not c.ok and c.blocking]
    if bad:
        return f"evidence does not agree: {bad[0].check} ({bad[0].detail})"
    return None


def findings(
    files: RunFiles,
    scope: str | None,
    audit: AuditSection,
    policy: PolicySection,
    privacy: list[SitePrivacy],
    epsilon_warn: float = DEFAULT_EPSILON_WARN,
) -> list[Finding]:
    out: list[Finding] = []

    def add(severity: Severity, section: str, message: str) -> None:
        out.append(Finding(severity=severity, section=section, message=message))

    for log in audit.logs:
        if log.status == "failed":
            add("error", "audit", f"{log.log}: {log.problem}")
    asserted = [log for log in audit.logs if log.status == "self-asserted"]
    if len(asserted) == 1:
        log = asserted[0]
        add(
            "warning",
            "audit",
            f"{log.log} ({log.party}) is intact only under a key "
            f"taken from the run directory ({log.key_source}, "
            f"{log.key_fingerprint}): compare it with the party's key "
            "registered out of band, or pass it with --trust",
        )
    elif asserted:
        add(
            "warning",
            "audit",
            f"{len(asserted)} logs ({', '.join(lg.party for lg in asserted)})"
            " are intact only under keys taken from the run directory "
            "(fingerprints in Annex D): compare them with the parties' "
            "keys registered out of band, or pass them with --trust",
        )
    for c in audit.cross_checks:
        if not c.ok:
            add("error" if c.blocking else "warning", "audit", f"{c.check}: {c.detail}")
    keys = [
        k
        for k in files.private_keys
        if scope is None or not k.startswith("sites/") or k.startswith(f"sites/{scope}/")
    ]
    if keys:
        shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        add(
            "warning",
            "audit",
            f"{len(keys)} private signing key(s) are inside the run "
            f"directory ({shown}): whoever holds this directory can "
            "re-sign every such log",
        )
    for p in privacy:
        if p.unsigned_fields:
            add(
                "warning",
                "privacy",
                f"{p.site_id}: ledger {', '.join(p.unsigned_fields)} "
                "are not in the site's signed log: shown unsigned",
            )
    for s in files.sites.values():
        if s.manifest is not None and s.manifest.min_cohort_size < 5:
            add(
                "warning",
                "policy",
                f"{s.site_id} sets min_cohort_size "
                f"{s.manifest.min_cohort_size} (< 5): counts that small "
                "can identify people; use at least 5",
            )
    if not files.config.dp:
        add(
            "error",
            "privacy",
            "differential privacy was OFF in this run: no (epsilon, delta) "
            "bound holds for what the sites released",
        )
    for p in privacy:
        if p.dp and p.budget_left is not None and p.epsilon_run and p.budget_left < p.epsilon_run:
            add(
                "info",
                "privacy",
                f"{p.site_id} has epsilon {p.budget_left:.3g} left, less "
                "than this run spent: it would decline part of a similar run",
            )
    for row in policy.run_decisions:
        if "conflict" in row.flags:
            add("warning", "policy", f"{row.rule_id} at {row.site_id}: {row.reason}")
        if "non-private" in row.flags:
            add("warning", "policy", f"{row.rule_id} at {row.site_id}: non-private run")
    for site_id, why in policy.unusable_sites.items():
        add("warning", "policy", f"{site_id} could not take part: {why}")
    for site_id, late in policy.rights_overdue.items():
        if late != 0:
            add(
                "warning",
                "policy",
                f"{site_id}: {late} data-subject request(s) answered late "
                "or overdue (GDPR Art. 12(3); DPDP Rules r.14(3))",
            )
    stale = adequacy_staleness(datetime.now(UTC).date())
    if stale:
        add("warning", "policy", stale)
    for row in policy.run_decisions:
        if row.outcome == "deny" and row.site_id is None:
            add("error", "policy", f"the run was refused ({row.rule_id}): {row.reason}")
    for site_id, why in policy.denied_sites.items():
        add("info", "policy", f"{site_id} was denied and never sampled: {why}")
    for r in policy.rights:
        if r.kind == "erasure":
            add(
                "warning",
                "policy",
                f"{r.site_id}: erasure requests handled ({r.count}) from "
                f"round {r.excluded_from_round}; models trained before "
                "them are not unlearned: record Art. 17(3)(d) or retrain",
            )
    declined: dict[str, list] = {}
    for d in policy.declines:
        declined.setdefault(d.site_id, []).append(d)
    for site_id, ds in declined.items():
        rounds = ", ".join(str(d.round) for d in ds)
        add(
            "info",
            "policy",
            f"{site_id} declined {len(ds)} round(s) ({rounds}); first: {ds[0].reason}",
        )
    decl = files.declaration
    names = {decl.controller.name} | {p.name for p in decl.joint_controllers}
    unnamed = []
    for s in files.sites.values():
        m = s.manifest
        if m is None or (scope is None and s.site_id not in files.eligible):
            continue
        if decl.registry is not None:  # the registry names the parties (gate GDPR-26-28)
            continue
        if m.role != "processor" and m.institution not in names:
            unnamed.append(f"{m.site_id} ({m.institution}, {m.role})")
    if decl.registry is not None:
        outside, involved = set(), set()
        coordinator = decl.registry.coordinator()
        if coordinator is not None:
            involved.add(coordinator.entity_id)
        for s in files.sites.values():
            m = s.manifest
            if m is None or s.site_id not in files.eligible:
                continue
            party = decl.registry.party_of_site(m.site_id, m.legal_entity_id)
            if party is None:
                continue
            involved.add(party.entity_id)
            if "gdpr" in m.law_packs and not is_eea(party.country):
                outside.add(party.entity_id)
        for line in registry_findings(decl.registry, sorted(outside), sorted(involved)):
            add("warning", "records", line)
    if unnamed:
        add(
            "warning",
            "records",
            f"{len(unnamed)} site(s) act as controllers but are not named "
            "among the run's controllers: check the Art. 26 arrangement: " + "; ".join(unnamed),
        )
    weak = [p for p in privacy if any("warning level" in w for w in p.warnings)]
    if weak:
        add(
            "warning",
            "privacy",
            f"{len(weak)} site(s) spent more than epsilon "
            f"{epsilon_warn:g} in this run, a weak guarantee: "
            + ", ".join(f"{p.site_id} {p.epsilon_run:.3g}" for p in weak),
        )
    loose = [p for p in privacy if any("1/n" in w for w in p.warnings)]
    if loose:
        add(
            "warning",
            "privacy",
            f"{len(loose)} site(s) use a delta above 1/n (n = records "
            "evaluated): " + ", ".join(p.site_id for p in loose),
        )
    if not decl.dpia_id:
        add("warning", "dpia", "no DPIA id is declared for this run")
    if scope is None and model_file_encrypted(files.model_path) is False:
        add("info", "records", "final_model.pt is stored unencrypted at the server")
    if (
        scope is None
        and files.run_end is not None
        and files.run_end.details.get("metrics_sha256") is None
    ):
        add(
            "warning",
            "learning",
            "the learning results come from metrics.jsonl, which this "
            "server log does not sign: shown unsigned",
        )
    stopped = signed_stop(files)
    if stopped:
        add("warning", "run", f"the run stopped early: {stopped}")
    order = {"error": 0, "warning": 1, "info": 2}
    return group_findings(sorted(out, key=lambda f: order[f.severity]), sorted(files.sites))


def incident_rows(run_dir: Path, scope: str | None) -> list[IncidentRow]:
    """The run's incidents (``fedmeta incident scan``), a site's own only in a site report."""
    from fedmeta.incidents import IncidentStore, clocks
    from fedmeta.incidents.store import IncidentError

    try:
        incidents = IncidentStore(run_dir).load()
    except IncidentError as exc:
        raise UnverifiedRunError(str(exc)) from None
    at = datetime.now(UTC)
    rows = []
    for i in incidents:
        if scope is not None and i.site_id != scope:
            continue
        cl = clocks(i, at)
        done = i.decision is not None
        dpdp = next((c for c in cl if c.reference.endswith("r.7(2)(b)")), None)
        rows.append(
            IncidentRow(
                id=i.id,
                kind=i.kind,
                site_id=i.site_id,
                summary=i.summary,
                aware_at=i.aware_at.isoformat(timespec="minutes"),
                art33_deadline=f"{cl[0].deadline:%Y-%m-%d %H:%M} UTC ({cl[0].state(at, done)})",
                dpdp_deadline=(
                    f"{dpdp.deadline:%Y-%m-%d %H:%M} UTC ({dpdp.state(at, done)}; {dpdp.in_force})"
                    if dpdp and dpdp.deadline
                    else None
                ),
                status=i.status,
                reasons=i.decision.reasons if i.decision else None,
            )
        )
    return rows


def unsigned_figures(files: RunFiles, scope: str | None, privacy: list[SitePrivacy]) -> list[str]:
    """The figures the report shows that no signed entry backs, in short."""
    out = []
    ledger: dict[str, list[str]] = {}
    for p in privacy:
        if p.unsigned_fields:
            ledger.setdefault(", ".join(p.unsigned_fields), []).append(p.site_id)
    out += [f"ledger {fields} ({', '.join(sites)})" for fields, sites in ledger.items()]
    manifests = [
        s.site_id
        for s in files.sites.values()
        if s.manifest is not None
        and (scope is not None or s.site_id in files.eligible)
        and not signed_manifest_hashes(files, s)
    ]
    if manifests:
        out.append(f"site manifests ({', '.join(manifests)})")
    if metrics_signed(files) is None:
        out.append("learning results (metrics.jsonl)")
    return out


def evidence_basis(files: RunFiles, audit: AuditSection) -> tuple[str, bool]:
    """(the report's first line, whether every log was checked under a trusted key)."""
    present = [lg for lg in audit.logs if lg.status != "missing"]
    untrusted = [lg.party for lg in present if lg.key_source != "trusted"]
    sim = transport(files) == "simulation"
    if not untrusted:
        line = (
            f"EVIDENCE: every log was checked against a key given from outside the run "
            f"directory (--trust, {len(present)} part{'y' if len(present) == 1 else 'ies'})"
        )
    elif len(untrusted) == len(present):
        line = (
            "SELF-ASSERTED EVIDENCE: every key was taken from the run directory itself, so "
            "the logs prove only that they are consistent with keys whoever holds this "
            "directory could have replaced; give the parties' keys with --trust"
        )
    else:
        line = (
            f"PARTLY SELF-ASSERTED EVIDENCE: the keys of {', '.join(untrusted)} were taken "
            "from the run directory itself (not given with --trust); their logs are "
            "self-asserted"
        )
    if sim:
        line += (
            "; SIMULATION: one machine held every party's private key, so no log is "
            "independent evidence of another party"
        )
    elif files.private_keys:
        line += "; private signing keys are inside the run directory"
    return line + ".", not untrusted


def build_report(
    run_dir: Path,
    site: str | None = None,
    allow_unverified: bool = False,
    baseline: Path | None = None,
    trust: dict[str, Anchor] | None = None,
    epsilon_warn: float = DEFAULT_EPSILON_WARN,
) -> Report:
    """Read, verify and summarise a run; raise UnverifiedRunError unless it verifies.

    ``trust``: party -> key given from outside the run (:func:`fedmeta.report.trust.
    load_trust`). A final model file that is not the signed one stops the report even
    with ``allow_unverified``.
    """
    files = read_run(Path(run_dir), site, trust)
    audit = audit_section(files, site)
    fatal = next((c for c in audit.cross_checks if c.fatal and not c.ok), None)
    if fatal is not None:
        raise UnverifiedRunError(f"{fatal.check}: FAILED ({fatal.detail}); no report written")
    problem = verification_problem(audit)
    if problem and not allow_unverified:
        raise UnverifiedRunError(
            f"{problem}; no report written (--allow-unverified writes one with a warning banner)"
        )
    policy = policy_section(files, site)
    policy = policy.model_copy(
        update={"site_decision_groups": group_decisions(policy.site_decisions)}
    )
    privacy = [
        with_plain_language(p, policy.records_evaluated.get(p.site_id), epsilon_warn)
        for p in privacy_section(files)
    ]
    warning = None
    if problem:
        n = sum(lg.status == "failed" for lg in audit.logs) + sum(
            not c.ok and c.blocking for c in audit.cross_checks
        )
        warning = (
            f"UNVERIFIED: {n} audit check(s) failed, first: {problem}. Only the entries "
            "before a log's first bad entry were used. Do not rely on this report."
        )
    basis, trusted = evidence_basis(files, audit)
    unsigned = unsigned_figures(files, site, privacy)
    if unsigned:
        basis = (
            basis[:-1]
            + "; shown UNSIGNED (no signed entry backs them): "
            + "; ".join(unsigned)
            + "."
        )
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    run = run_summary(files, site)
    records = records_of_processing(files, audit.all_verified, site)
    incidents = incident_rows(Path(run_dir), site)
    found = findings(files, site, audit, policy, privacy, epsilon_warn)
    for row in incidents:
        if row.reasons is None:
            found.insert(
                0,
                Finding(
                    severity="error" if "OVERDUE" in row.art33_deadline else "warning",
                    section="incidents",
                    message=f"incident {row.id} ({row.kind}) has no "
                    f"notification decision yet: GDPR Art. 33(1) deadline {row.art33_deadline}",
                ),
            )
    the_dpia = dpia(files, site, policy, privacy)
    return Report(
        evidence_basis=basis,
        keys_trusted=trusted,
        unsigned=unsigned,
        report_id=report_id(files.run_id, site, generated),
        generated_at=generated,
        generator=_generator(),
        run_dir=str(Path(run_dir).resolve()),
        scope=Scope(kind="site" if site else "federation", site_id=site),
        checks_passed=problem is None,
        verified=problem is None and trusted,
        unverified_warning=warning,
        summary=summary(
            run,
            found,
            privacy,
            problem is None,
            dpia_line(the_dpia),
            [
                f"{d.rule_id}: {d.reason}"
                for d in policy.run_decisions
                if d.outcome == "deny" and d.site_id is None
            ],
        ),
        run=run,
        parties=parties(files, site),
        records_of_processing=records,
        shared_measures=shared_measures(records),
        dpia=the_dpia,
        privacy=privacy,
        policy=policy,
        dpdp=dpdp_section(files),
        learning=learning_section(files, site, baseline),
        audit=audit,
        findings=found,
        incidents=incidents,
        rules=rule_annex(status_on_report_date),
        epsilon_warn=epsilon_warn,
        disclaimer=DISCLAIMER,
    )
