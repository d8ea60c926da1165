"""A DPIA-ready summary (GDPR Art. 35(7)(a)-(d)) filled from what the run actually did.

The criteria are WP248 rev.01's (endorsed by the EDPB) and Art. 35(3)(b); the
federated-learning risks are pre-populated (membership inference and
reconstruction, poisoning, re-identification from the model, erasure, transfers). Where
the run's data cannot decide (e.g. "large scale"), the answer is "unknown" and
the question goes to ``to_complete``.
"""

from __future__ import annotations

from datetime import date

from fedmeta.report.collect import RunFiles
from fedmeta.report.model import (
    AssessedRisk,
    Dpia,
    DpiaRecordView,
    PolicySection,
    Risk,
    RiskCriterion,
    SitePrivacy,
)
from fedmeta.report.policy import CHILD_RULES, CONSENT_RULES, ERASURE_RULES
from fedmeta.report.records import link_measures
from policies import get_purpose
from policies.countries import is_eea
from policies.dpia import DECISION_WORDS, DpiaRisk, approval_problems, stale_reasons

WP248 = "WP248 rev.01"


def _manifests(files: RunFiles, scope: str | None) -> list:
    return [
        s.manifest
        for s in files.sites.values()
        if s.manifest is not None and (scope is not None or s.site_id in files.eligible)
    ]


def criteria(files: RunFiles, scope: str | None, policy: PolicySection) -> list[RiskCriterion]:
    manifests = _manifests(files, scope)
    purpose = get_purpose(files.declaration.purpose)
    special = sorted({c for m in manifests for c in m.special_categories})
    subjects = sorted({s for m in manifests for s in m.data_subjects})
    vulnerable = [s for s in subjects if s in ("patients", "minors")]
    n_sites = len(manifests)
    records = ", ".join(f"{k}: {v}" for k, v in policy.records_evaluated.items()) or "unknown"
    care = purpose.id.startswith("care.")
    yes_no = {True: "yes", False: "no"}
    return [
        RiskCriterion(
            criterion="Sensitive data or data of a highly personal nature",
            source=WP248,
            applies=yes_no[bool(special)],
            evidence=f"special categories (Art. 9(1)): {', '.join(special) or 'none'}",
        ),
        RiskCriterion(
            criterion="Data concerning vulnerable data subjects",
            source=WP248,
            applies=yes_no[bool(vulnerable)],
            evidence=f"data subjects: {', '.join(subjects) or 'none declared'}",
        ),
        RiskCriterion(
            criterion="Innovative use or new technological solutions",
            source=WP248,
            applies="yes",
            evidence="federated meta-learning (Reptile) with DP-SGD at each site; "
            "the ICO lists AI as innovative technology",
        ),
        RiskCriterion(
            criterion="Matching or combining datasets",
            source=WP248,
            applies="yes",
            evidence=(
                "one model is trained on the data of "
                + (
                    f"{n_sites} institutions"
                    if scope is None
                    else "this site and other institutions"
                )
                + " (interpretation: combination without pooling)"
            ),
        ),
        RiskCriterion(
            criterion="Data processed on a large scale",
            source=WP248,
            applies="unknown",
            evidence=f"records evaluated in the last round: {records}; not decided automatically",
        ),
        RiskCriterion(
            criterion="Evaluation or scoring",
            source=WP248,
            applies="unknown" if care else "no",
            evidence=f"purpose {purpose.id}: {purpose.description}",
        ),
        RiskCriterion(
            criterion="Automated decision-making with legal or similar effect",
            source=WP248,
            applies="unknown" if care else "no",
            evidence="depends on how the tool is used in care"
            if care
            else "research purpose: no decision about any individual",
        ),
        RiskCriterion(
            criterion="Systematic monitoring",
            source=WP248,
            applies=yes_no[purpose.monitors_people],
            evidence=f"purpose {purpose.id}",
        ),
        RiskCriterion(
            criterion="Processing that prevents data subjects from exercising a right",
            source=WP248,
            applies="yes",
            evidence="erasure and withdrawal reach future rounds only: trained models "
            "are not unlearned (interpretation)",
        ),
        RiskCriterion(
            criterion="Large-scale processing of special categories",
            source="GDPR Art. 35(3)(b)",
            applies="unknown" if special else "no",
            evidence="special categories present; scale to be assessed"
            if special
            else "no special categories",
        ),
    ]


def _eps_text(privacy: list[SitePrivacy]) -> str:
    dp = [p for p in privacy if p.dp and p.epsilon_run is not None]
    if not dp:
        return "no site trained with differential privacy in this run"
    hi = max(dp, key=lambda p: p.epsilon_run or 0.0)
    return (
        f"sample-level DP-SGD at every site: this run's epsilon up to "
        f"{hi.epsilon_run:.3g} (delta {hi.delta:g}, {hi.accountant} accountant), "
        f"clipping norm {hi.clip_norm:g}"
    )


def risks(
    files: RunFiles, scope: str | None, policy: PolicySection, privacy: list[SitePrivacy]
) -> list[Risk]:
    cfg = files.config
    decl = files.declaration
    auth = link_measures(files)[1]
    dp = _eps_text(privacy)
    manifests = _manifests(files, scope)
    excl = {r.rule_id for r in policy.exclusions}
    erasures = [r for r in policy.rights if r.kind == "erasure"]
    countries = sorted({m.country for m in manifests} | {decl.server_country})
    third = [c for c in countries if not is_eea(c)]
    dropped = sum(len(m.get("dropped") or {}) for m in files.round_lines)
    conflicts = [r for r in policy.run_decisions if "conflict" in r.flags]
    rights_rules = ", ".join(sorted(excl & set(ERASURE_RULES + CONSENT_RULES))) or "none triggered"
    return [
        Risk(
            risk="Leakage from model updates; membership inference",
            description="updates and models can reveal whether a record was used, or "
            "reconstruct training data (EDPS TechDispatch 1/2025)",
            mitigations=[
                dp,
                "only updates leave a site, never records",
                f"per-site budget enforced by a durable ledger (declines: {len(policy.declines)})",
            ],
            residual="secure aggregation is off: the server sees each site's update; no "
            "membership-inference audit is attached (e.g. OpenFL's Privacy Meter)",
            references=["GDPR Art. 25(1)", "GDPR Art. 32(1)", "EDPS TechDispatch 1/2025"],
        ),
        Risk(
            risk="Poisoning; integrity of local updates",
            description="a site or an attacker sends updates that corrupt the model",
            mitigations=[
                f"updates checked for shape, finite values and L2 norm <= "
                f"{cfg.max_update_norm:g} ({dropped} reply(ies) dropped)",
                f"at least {max(cfg.min_sites, decl.min_sites_per_round)} sites per round",
                "signed, hash-chained audit logs with cross-party receipts",
            ],
            residual=f"no robust aggregation; node authentication: {auth.status}",
            references=["GDPR Art. 32(1)(b)"],
        ),
        Risk(
            risk="Re-identification from the released model",
            description="a model trained on personal data is not anonymous in all cases "
            "(EDPB Opinion 28/2024)",
            mitigations=[
                dp,
                "the model is treated as personal data: transfers to sites checked (GDPR-44-MODEL)",
            ],
            residual="no anonymity assessment is attached: the model must not be released "
            "or labelled as anonymous (a model is not presumed anonymous)",
            references=["GDPR Recital 26", "EDPB Opinion 28/2024"],
        ),
        Risk(
            risk="Erasure and consent withdrawal on trained models",
            description="a data subject's erasure or withdrawal cannot be applied to a model "
            "already trained",
            mitigations=[
                f"records with erasure requests or without valid consent are left "
                f"out from the next round on (rules applied: {rights_rules})",
                "DP bounds each record's influence on every released model",
            ],
            residual=(
                f"{len(erasures)} site(s) handled erasure requests in this run: models "
                "from earlier rounds and runs are not unlearned; record the Art. 17(3)(d) "
                "exemption or a retraining decision"
            )
            if erasures
            else "no erasure request handled in this run; earlier models are not unlearnable",
            references=[
                "GDPR Art. 7(3)",
                "GDPR Art. 17(1)",
                "GDPR Art. 17(3)(d)",
                "DPDP Act 2023 s.12(3)",
            ],
        ),
        Risk(
            risk="Cross-border aggregation",
            description="updates and models cross borders between sites and the server",
            mitigations=[
                f"countries: {', '.join(countries)}; server in {decl.server_country}",
                "every transfer decided by rule "
                "(GDPR-44, GDPR-44-MODEL, DPDP-16) before any data moved",
                f"{len(policy.denied_sites)} site(s) denied",
            ],
            residual=(
                f"third countries involved: {', '.join(third)}; the SCC references are "
                "declared, not checked against signed clauses"
            )
            if third
            else "all parties in the EEA",
            references=["GDPR Art. 44-46", "DPDP Act 2023 s.16(1)"],
        ),
        Risk(
            risk="Unlawful use of individual records",
            description="records used without consent, of children, or past retention",
            mitigations=[
                "record-level rules before every round; excluded records never reach "
                "the trainer (rules that excluded records: "
                f"{', '.join(sorted(excl)) or 'none'})"
            ],
            residual="depends on the accuracy of each site's record metadata"
            + (
                " (children's records excluded by "
                + ", ".join(sorted(excl & set(CHILD_RULES)))
                + ")"
                if excl & set(CHILD_RULES)
                else ""
            ),
            references=["GDPR Art. 5(1)(e)", "GDPR Art. 7", "GDPR Art. 8", "DPDP Act 2023 s.9"],
        ),
        Risk(
            risk="Code executed at the sites",
            description="the coordinator ships the training code each site runs; modified "
            "code could read more records or send more than declared",
            mitigations=[
                "each site trains only under a run declaration it approved "
                "(signed hash in every round.train entry)",
                "the site's own privacy policy is enforced at the site, whatever "
                "the coordinator asks",
            ],
            residual="unless sites pin the application's hash, a modified app bypasses the "
            "site's checks (deployment trust)",
            references=["GDPR Art. 32(1)(b)", "GDPR Art. 25(1)"],
        ),
        Risk(
            risk="Site insiders",
            description="staff with access to a node, its keys or its record metadata "
            "misuse them, or alter the site's evidence",
            mitigations=[
                "signed, hash-chained audit log at every site, receipts held by the server",
                "keys created at the site, 0600",
            ],
            residual="organisational: who may operate the node is for the site to decide "
            "and record",
            references=["GDPR Art. 32(4)", "GDPR Art. 5(1)(f)"],
        ),
        Risk(
            risk="Later use of the model",
            description="the model is reused for other purposes, used for decisions about "
            "patients, or gives biased or wrong outputs",
            mitigations=[
                f"purpose {decl.purpose} declared and approved by each site",
                "the model is treated as personal data (no release without an "
                "anonymity assessment)",
            ],
            residual="no model card, bias evaluation or release gate is attached: a new "
            "use needs a new purpose and DPIA",
            references=["GDPR Art. 5(1)(b)", "GDPR Art. 22", "EDPB Opinion 28/2024"],
        ),
        Risk(
            risk="Logs as personal data; log retention",
            description="audit logs and ledgers are kept for accountability",
            mitigations=[
                "logs hold pseudonymous site ids, hashes and counts, never records or "
                "direct identifiers",
                f"server keeps logs {decl.log_retention_days} days",
            ],
            residual=(
                "GDPR/DPDP log-retention conflict flagged: a person must decide"
                if conflicts
                else "no retention conflict flagged"
            ),
            references=["GDPR Art. 5(1)(e)", "DPDP Rules 2025 r.6(1)(e)", "r.8(3)"],
        ),
    ]


def _rating(likelihood: str, severity: str) -> str:
    return f"{DpiaRisk.level(likelihood, severity)} ({likelihood} x {severity})"


def record_view(files: RunFiles, policy: PolicySection) -> DpiaRecordView | None:
    """The declaration's DPIA record and the gate's decision on it (GDPR-35)."""
    rec = files.declaration.dpia
    if rec is None:
        return None
    gate = next((d for d in policy.run_decisions if d.rule_id == "GDPR-35"), None)
    if gate is not None:
        gate_text, ok = f"{gate.outcome}: {gate.reason}", gate.outcome != "deny"
    else:  # a run made before the gate existed: check the record as the gate would
        problems = approval_problems(rec) + stale_reasons(
            rec,
            files.declaration.epsilon if files.declaration.dp_enabled else None,
            files.declaration.purpose,
            [
                (s.manifest.site_id, s.manifest.country)
                for s in files.sites.values()
                if s.manifest is not None and s.site_id in files.eligible
            ],
            None,
            date.today(),
        )
        gate_text = (
            "not checked when the run started (no GDPR-35 decision in its "
            "log); checked now: " + ("; ".join(problems) if problems else "covers the run")
        )
        ok = not problems
    sc = rec.scope
    scope = (
        f"{len(sc.sites)} site(s); countries {', '.join(sorted(sc.countries))}; "
        f"purposes {', '.join(sorted(sc.purposes))}; epsilon up to "
        f"{'-' if sc.max_epsilon is None else f'{sc.max_epsilon:g}'}; transports "
        f"{', '.join(sorted(sc.transports))}"
        + ("; non-private runs assessed" if sc.non_private else "")
    )
    return DpiaRecordView(
        dpia_id=rec.id,
        version=rec.version,
        title=rec.title,
        status=rec.status,
        decision=DECISION_WORDS.get(rec.decision or "", None),
        conditions=list(rec.conditions),
        decided_by=rec.decided_by,
        decided_on=rec.decided_on.isoformat() if rec.decided_on else None,
        dpo_advice=rec.dpo_advice,
        dpo_advice_date=rec.dpo_advice_date.isoformat() if rec.dpo_advice_date else None,
        dpo_advice_followed=rec.dpo_advice_followed,
        data_subjects_views=rec.data_subjects_views,
        review_date=rec.review_date.isoformat(),
        review_triggers=list(rec.review_triggers),
        scope=scope,
        gate=gate_text,
        gate_ok=ok,
        risks=[
            AssessedRisk(
                id=r.id,
                risk=r.title,
                description=r.description,
                inherent=_rating(r.likelihood_before, r.severity_before),
                measures=list(r.measures),
                residual=_rating(r.likelihood_after, r.severity_after),
            )
            for r in rec.risks
        ],
    )


def dpia(
    files: RunFiles, scope: str | None, policy: PolicySection, privacy: list[SitePrivacy]
) -> Dpia:
    decl = files.declaration
    purpose = get_purpose(decl.purpose)
    crit = criteria(files, scope, policy)
    n_yes = sum(c.applies == "yes" for c in crit if c.source == WP248)
    required = (
        f"likely required: {n_yes} WP248 criteria apply (two or more)"
        if n_yes >= 2
        else f"{n_yes} WP248 criterion applies: assess whether a DPIA is required"
    )
    manifests = _manifests(files, scope)
    where = (
        "this site"
        if scope is not None
        else f"{len(manifests)} site(s) in {', '.join(sorted({m.country for m in manifests}))}"
    )
    description = [
        f"Purpose {purpose.id}: {purpose.description}",
        f"{where} train a shared model initialisation ({files.config.strategy} on task "
        f"{files.config.task}) for {files.config.rounds} round(s); the server in "
        f"{decl.server_country} aggregates their updates.",
        "At each site: policy rules select the records that may be used; DP-SGD trains on them; "
        "the site sends back a model update, counts of excluded records by rule and its audit "
        "head. Records and record ids never leave a site.",
        "Evidence: signed audit logs at every party, a durable privacy ledger per site, and "
        "this report.",
    ]
    necessity = [
        f"lawful basis GDPR Art. 6(1)({decl.lawful_basis})"
        if decl.lawful_basis
        else "no GDPR lawful basis declared",
        f"special-category condition Art. 9(2)({decl.special_category_condition}) unless a "
        "site declares its own; the law behind it is each site's (records of processing)"
        if decl.special_category_condition
        else "Art. 9(2) condition: each site's own (records of processing)",
        "data minimisation: only model updates and counts leave the sites; federated learning "
        "is chosen so that records need not be pooled",
        f"storage limitation: records older than each site's retention limit are excluded; "
        f"models kept {decl.model_retention_days} days, logs {decl.log_retention_days} days",
        "purpose limitation: each site approves the run's purpose (GDPR-5-1-b, DPDP-6-1)",
    ]
    to_complete = [
        "Art. 35(2): the DPO's advice and the date it was given",
        "Art. 35(9): the views of data subjects or their representatives, where appropriate",
        "Art. 35(11): when the DPIA is reviewed (e.g. a new site, a new purpose, a change "
        "of epsilon)",
        "Art. 89(1): can the purpose be met with data that do not identify anyone? If so, "
        "it must be done that way",
        "Large scale: is the processing on a large scale (Art. 35(3)(b))?",
        "Anonymity assessment of the model before any release (EDPB Opinion 28/2024)",
        "Art. 26: reference of the joint-controller arrangement and its essence for data subjects",
        "Art. 36: prior consultation if a high residual risk remains",
    ]
    record = record_view(files, policy)
    if record is not None:  # what the DPIA record answers is no longer to complete
        done = (
            ["Art. 35(11)"]
            + (["Art. 35(2)"] if record.dpo_advice else [])
            + (["Art. 35(9)"] if record.data_subjects_views else [])
        )
        to_complete = [x for x in to_complete if not any(x.startswith(d) for d in done)]
    elif not decl.dpia_id:
        to_complete.insert(0, "No DPIA id is declared for this run (dpia_id)")
    else:
        to_complete.insert(
            0,
            f"The DPIA {decl.dpia_id} is named but not attached: add its "
            "record with dpia_file in the run declaration",
        )
    return Dpia(
        dpia_id=decl.dpia_id,
        required=required,
        description=description,
        necessity=necessity,
        criteria=crit,
        risks=risks(files, scope, policy, privacy),
        to_complete=to_complete,
        record=record,
    )


def dpia_line(d: Dpia) -> str:
    """The DPIA in one line for page one."""
    if d.record is not None:
        r = d.record
        return (
            f"{r.dpia_id} v{r.version}, {r.status}, {r.decision or 'no decision'}; "
            f"review by {r.review_date}; gate: {'passed' if r.gate_ok else 'REFUSED'}"
        )
    return f"{d.dpia_id} (declared; no DPIA record attached)" if d.dpia_id else "none declared"
