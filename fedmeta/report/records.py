"""Parties and the records of processing (GDPR Art. 30(1) per controller, 30(2) per processor).

A site's record covers the processing at that institution for this run; the
coordinating controller's record (federation report only) covers the
aggregation server. The technical and organisational measures are the ones
actually in force in the run (read from its config, ledgers, logs and the
server's run.start entry), not the ones the software could offer.
"""

from __future__ import annotations

from fedmeta.report.collect import RunFiles, SiteFiles, model_file_encrypted
from fedmeta.report.evidence import signed_manifest_hashes
from fedmeta.report.model import (
    DataCategory,
    Measure,
    Party,
    ProcessingRecord,
    Retention,
    Status,
    Transfer,
)
from policies import SPECIAL_CATEGORIES, Decision, SiteManifest, get_purpose
from policies.countries import country_name, is_eea
from policies.declarations import ART9_NAMES, DPDP_GROUND_NAMES, GDPR_BASIS_NAMES
from policies.parties import DOCUMENT_NAMES, PartyRegistry

SIMULATION = "not applicable: simulation on one machine (no network link between parties)"
COORDINATOR_ROLE = "controller (coordinating; operates the aggregation server)"
UPDATES = (
    "model updates (phi) trained on the site's records, treated as personal data "
    "(EDPB Opinion 28/2024)"
)


def transport(files: RunFiles) -> str:
    for e in files.server_entries:
        if e.action == "run.start":
            return str(e.details.get("transport") or "not recorded")
    return "not recorded"


def link_measures(files: RunFiles) -> list[Measure]:
    """TLS and node authentication, from the transport the server's run.start entry names.

    ``simulation`` (one machine), ``tls+supernode-auth`` (a deployment, secure by
    default) or ``insecure`` (asked for by name).
    """
    mode = transport(files)
    out = []
    for name, token in (
        ("Transport encryption (TLS)", "tls"),
        ("Node authentication", "supernode-auth"),
    ):
        if mode == "simulation":
            out.append(Measure(measure=name, status="not applicable", detail=SIMULATION))
        elif mode == "insecure":
            out.append(
                Measure(
                    measure=name,
                    status="off",
                    detail=(
                        "insecure mode was asked for by name and recorded in the server's "
                        "run.start entry"
                    ),
                )
            )
        elif token in mode.split("+"):
            out.append(
                Measure(
                    measure=name,
                    status="on",
                    detail=f"transport {mode!r} (server's run.start entry)",
                )
            )
        else:
            out.append(
                Measure(
                    measure=name,
                    status="not recorded",
                    detail=f"the run records transport {mode!r}",
                )
            )
    return out


def _where(code: str) -> str:
    return f"{country_name(code)} ({code})"


def parties(files: RunFiles, site: str | None) -> list[Party]:
    decl = files.declaration
    out = [
        Party(
            name=decl.controller.name,
            role=COORDINATOR_ROLE,
            country=decl.controller.country,
            contact=decl.controller.contact_email,
            dpo=decl.controller.dpo_contact,
            source="run declaration",
        )
    ]
    out += [
        Party(
            name=p.name,
            role="joint controller",
            country=p.country,
            contact=p.contact_email,
            dpo=p.dpo_contact,
            source="run declaration",
        )
        for p in decl.joint_controllers
    ]
    for s in files.sites.values():
        m = s.manifest
        if m is None or (site is None and s.site_id not in files.eligible):
            continue
        out.append(
            Party(
                name=m.institution,
                role=m.role,
                country=m.country,
                dpo=m.dpo_contact,
                site_id=m.site_id,
                source=f"site manifest ({s.site_id}; "
                + (
                    "signed by the site)"
                    if signed_manifest_hashes(files, s)
                    else "UNSIGNED: as the server received it)"
                ),
            )
        )
    return out


def legal_basis(files: RunFiles, m: SiteManifest | None) -> list[str]:
    """The site's GDPR basis and Art. 9(2) condition (with the law behind them only where
    the law requires one: Art. 6(3) for (c)/(e), Art. 9(2)(g)-(j)), and its DPDP ground."""
    decl = files.declaration
    out = []
    basis = (m.lawful_basis if m and m.lawful_basis else None) or decl.lawful_basis
    if m is None or "gdpr" in m.law_packs:
        if basis:
            law = (
                f"; law (Art. 6(3)): {m.art6_3_law}"
                if m and basis in ("c", "e") and m.art6_3_law
                else ""
            )
            out.append(f"GDPR Art. 6(1)({basis}) {GDPR_BASIS_NAMES[basis]}{law}")
        cond = (
            m.art9_condition if m and m.art9_condition else None
        ) or decl.special_category_condition
        if cond and (m is None or m.special_categories):
            law = (
                f"; law relied on: {m.art9_law}"
                if m and cond in ("g", "h", "i", "j") and m.art9_law
                else ""
            )
            out.append(f"GDPR Art. 9(2)({cond}) {ART9_NAMES[cond]}{law}")
    if m is not None and "dpdp" in m.law_packs:
        ground = m.dpdp_ground
        out.append(f"DPDP Act 2023: {DPDP_GROUND_NAMES.get(ground or '', 'no ground declared')}")
    return out or ["none declared"]


def _categories(cats: set[str]) -> list[DataCategory]:
    return [DataCategory(category=c, special=c in SPECIAL_CATEGORIES) for c in sorted(cats)]


def _decision(files: RunFiles, rule_id: str, site_id: str) -> Decision | None:
    return next((d for d in files.decisions if d.rule_id == rule_id and d.site_id == site_id), None)


def _transfer(d: Decision | None, data: str, origin: str, dest: str) -> Transfer:
    if d is None:
        return Transfer(
            data=data,
            origin=origin,
            destination=dest,
            ground="not evaluated (no GDPR rule applies)",
            decision="-",
        )
    return Transfer(
        data=data,
        origin=origin,
        destination=dest,
        ground=d.reason,
        decision=d.outcome.value,
        rule_id=d.rule_id,
    )


def _dp_detail(files: RunFiles, site: SiteFiles | None) -> tuple[Status, str]:
    cfg = files.config
    if not cfg.dp:
        return "off", "differential privacy was turned OFF for this run (--no-dp)"
    if site is not None and site.ledger is not None:
        mine = [c for c in site.ledger.charges if c.run == files.run_id]
        if mine:
            sig = sorted({c.noise_multiplier for c in mine})
            q = sorted({c.sample_rate for c in mine})
            return "on", (
                f"DP-SGD (Opacus) at the site: sample-level, epsilon {mine[-1].epsilon_after:.3g} "
                f"cumulative after this run (delta {site.ledger.delta:g}, "
                f"{site.ledger.accountant.upper()} accountant), noise multiplier "
                f"{', '.join(f'{s:g}' for s in sig)}, per-sample clipping norm "
                f"{cfg.max_grad_norm:g}, Poisson sampling rate {', '.join(f'{x:.4g}' for x in q)}, "
                f"{cfg.inner_steps} steps per round; budget epsilon_max "
                f"{site.ledger.epsilon_max:g}"
            )
    decl = files.declaration
    return "on", (
        f"DP-SGD at every site: sample-level; the run offers epsilon {decl.epsilon:g}, "
        f"delta {decl.delta:g} per site; noise multiplier {cfg.noise_multiplier:g}, "
        f"clipping norm {cfg.max_grad_norm:g}, {cfg.accountant.upper()} accountant"
    )


def pseudonymisation(files: RunFiles) -> str:
    """What pseudonymisation there is, as it is (records never leave; parties are named)."""
    sim = transport(files) == "simulation"
    ids = (
        "site ids are generated labels (site-N)"
        if sim
        else "site ids are the labels chosen in the federation file, which the coordinator "
        "maps to institutions"
    )
    return (
        f"records and record ids never leave the site; the record metadata the rules use "
        f"stays at the site. Parties are NOT pseudonymous to the controller: {ids}, and "
        "each site's manifest (institution, country) is shared with the server and shown "
        "in this report"
    )


def update_retention(files: RunFiles) -> str:
    """Where the sites' updates (phi) are held, as it is in simulation and in deployment."""
    if transport(files) == "simulation":
        return (
            "simulation: held in the memory of the one simulation process for the "
            "round's aggregation; not written to disk by fedmeta"
        )
    return (
        "deployment: each update passes through the SuperLink, which stores messages in "
        "its state database (start-superlink.sh: --database $STATE/superlink.db) until "
        "Flower deletes them; fedmeta sets no retention period for that database, and the "
        "server holds the updates in memory for the round's aggregation"
    )


def measures(files: RunFiles, site: SiteFiles | None, audit_ok: bool) -> list[Measure]:
    """Art. 32(1) / Art. 25 measures in force in this run, at a site or at the server."""
    cfg = files.config
    dp_status, dp_text = _dp_detail(files, site)
    out = [
        Measure(measure="Differential privacy (sample level)", status=dp_status, detail=dp_text),
        Measure(
            measure="Client-level differential privacy at the server",
            status="off",
            detail="no server-side DP wrapper: the aggregate is protected only by each "
            "site's sample-level DP",
        ),
        Measure(
            measure="Secure aggregation",
            status="off",
            detail="the server sees each site's update in the clear before aggregating",
        ),
        *link_measures(files),
        Measure(
            measure="Tamper-evident audit log",
            status="on",
            detail="append-only, hash-chained, Ed25519-signed logs at the server and each "
            "site, entries durable before the action; re-checked for this report: "
            + (
                (
                    "all verified against keys given from outside the run"
                    if files.keys_trusted
                    else "all intact, but under keys taken "
                    "from the run directory (self-asserted, not verified)"
                )
                if audit_ok
                else "VERIFICATION FAILED"
            ),
        ),
    ]
    if site is None:
        enc = model_file_encrypted(files.model_path)
        out += [
            Measure(
                measure="Validation of site updates",
                status="on",
                detail=f"shapes, finite values and L2 norm <= {cfg.max_update_norm:g} "
                "checked before aggregation; failing replies are dropped and audited",
            ),
            Measure(
                measure="Minimum sites per round",
                status="on",
                detail=f"at least {max(cfg.min_sites, files.declaration.min_sites_per_round)} "
                "sites per round, else the round is not aggregated",
            ),
            Measure(
                measure="Encryption at rest of the model file",
                status="not recorded" if enc is None else "off",
                detail="no final model file"
                if enc is None
                else (
                    "fedmeta does not encrypt final_model.pt: it is a plain file at the "
                    "server, protected only by the host's file permissions and disk "
                    "encryption (if any)"
                ),
            ),
        ]
        return out
    m = site.manifest
    cols = list(m.feature_columns) if m else []
    out += [
        Measure(
            measure="Policy rules before every round",
            status="on",
            detail="site-level rules may decline the round; record-level rules (erasure, "
            "consent, children, retention) leave records out before training; only "
            "counts by rule leave the site",
        ),
        Measure(
            measure="Privacy budget",
            status="on" if site.ledger is not None else "off",
            detail="a durable ledger written before each reply; a round that would pass "
            "epsilon_max is declined"
            if site.ledger is not None
            else "no privacy ledger in this run directory",
        ),
        Measure(
            measure="Data minimisation",
            status="on" if cols else "partial",
            detail="only model updates, counts by rule and audit receipts leave the site; "
            "records and record ids never do; "
            + (
                f"feature columns allowed: {', '.join(cols)}"
                if cols
                else "no feature-column allow-list declared, so GDPR-5-1-c was not checked"
            ),
        ),
        Measure(measure="Pseudonymisation", status="partial", detail=pseudonymisation(files)),
    ]
    return out


def site_record(
    files: RunFiles, site: SiteFiles, audit_ok: bool, scope: str | None
) -> ProcessingRecord | None:
    m = site.manifest
    if m is None:
        return None
    decl = files.declaration
    purpose = get_purpose(decl.purpose)
    names = [decl.controller.name] + [p.name for p in decl.joint_controllers]
    joint = [n for n in names if n != m.institution] if m.role != "processor" else []
    server = f"{decl.controller.name}, aggregation server in {_where(decl.server_country)}"
    recipients = [
        f"{server}: {UPDATES}; counts of excluded records by rule; audit receipts",
        "every participating institution: the global model, trained in part on this site's data",
    ]
    transfers = []
    if not (is_eea(m.country) and is_eea(decl.server_country)):
        transfers.append(
            _transfer(
                _decision(files, "GDPR-44", m.site_id),
                UPDATES,
                _where(m.country),
                _where(decl.server_country),
            )
        )
        model = _decision(files, "GDPR-44-MODEL", m.site_id)
        transfers.append(
            _transfer(
                model,
                "global model (trained on all sites' data)",
                _where(decl.server_country),
                _where(m.country),
            )
        )
    if scope is None:
        for other in files.sites.values():
            om = other.manifest
            if om is None or om.site_id == m.site_id or om.site_id not in files.eligible:
                continue
            if not is_eea(om.country):
                d = _decision(files, "GDPR-44-MODEL", om.site_id)
                transfers.append(
                    _transfer(
                        d,
                        "global model (trained in part on this site's data)",
                        _where(decl.server_country),
                        f"{om.site_id}, {_where(om.country)}",
                    )
                )
    else:
        countries = sorted({p.country for p in decl.joint_controllers} - {m.country})
        if countries:
            recipients.append(
                "joint controllers in "
                + ", ".join(_where(c) for c in countries)
                + " (run declaration) receive the global model"
            )
    retention = [
        Retention(
            item=f"records ({c})",
            days=m.retention_days,
            held_by=m.site_id,
            source="site manifest retention_days",
        )
        for c in sorted(m.data_categories)
    ]
    retention += [
        Retention(
            item="site audit log",
            days=m.log_retention_days,
            held_by=m.site_id,
            source="site manifest log_retention_days",
        ),
        Retention(
            item="privacy ledger",
            days=None,
            held_by=m.site_id,
            source="kept for as long as the site takes part in runs (composition over "
            "all runs needs it); not declared",
        ),
        Retention(
            item="global model",
            days=decl.model_retention_days,
            held_by=decl.controller.name,
            source="run declaration model_retention_days",
        ),
    ]
    processor = m.role == "processor"
    return ProcessingRecord(
        article="30(2)" if processor else "30(1)",
        party=Party(
            name=m.institution,
            role=m.role,
            country=m.country,
            dpo=m.dpo_contact,
            site_id=m.site_id,
            source=f"site manifest ({m.site_id})",
        ),
        joint_controllers=joint,
        representative="not declared (Art. 27: needed only for a controller outside the EU)",
        purposes=[f"{purpose.id}: {purpose.description}"],
        legal_basis=legal_basis(files, m),
        data_subjects=sorted(m.data_subjects),
        data_categories=_categories(set(m.data_categories)),
        recipients=recipients,
        transfers=transfers,
        retention=retention,
        measures=measures(files, site, audit_ok),
        controllers_served=names if processor else [],
        processing_categories=[
            f"local training with differential privacy for {purpose.id}",
            "applying the run's record-level policy rules",
            "keeping the audit log and privacy ledger",
        ]
        if processor
        else [],
    )


def server_record(files: RunFiles, audit_ok: bool) -> ProcessingRecord:
    decl = files.declaration
    purpose = get_purpose(decl.purpose)
    manifests = [
        s.manifest
        for s in files.sites.values()
        if s.manifest is not None and s.site_id in files.eligible
    ]
    subjects = sorted({x for m in manifests for x in m.data_subjects})
    cats = {x for m in manifests for x in m.data_categories}
    transfers = []
    for m in manifests:
        if not is_eea(m.country):
            transfers.append(
                _transfer(
                    _decision(files, "GDPR-44-MODEL", m.site_id),
                    "global model",
                    _where(decl.server_country),
                    f"{m.site_id}, {_where(m.country)}",
                )
            )
    return ProcessingRecord(
        article="30(1)",
        party=Party(
            name=decl.controller.name,
            role=COORDINATOR_ROLE,
            country=decl.controller.country,
            contact=decl.controller.contact_email,
            dpo=decl.controller.dpo_contact,
            source="run declaration",
        ),
        joint_controllers=[p.name for p in decl.joint_controllers],
        representative="not declared (Art. 27: needed only for a controller outside the EU)",
        purposes=[f"{purpose.id}: {purpose.description}"],
        legal_basis=legal_basis(files, None),
        data_subjects=subjects,
        data_categories=_categories(cats),
        recipients=[
            f"{len(manifests)} participating institution(s) in "
            + ", ".join(sorted({_where(m.country) for m in manifests}))
            + ": the global model each round"
        ],
        transfers=transfers,
        retention=[
            Retention(
                item="global model and checkpoints",
                days=decl.model_retention_days,
                held_by=decl.controller.name,
                source="run declaration",
            ),
            Retention(
                item="server audit log, metrics and policy decisions",
                days=decl.log_retention_days,
                held_by=decl.controller.name,
                source="run declaration log_retention_days",
            ),
            Retention(
                item="site updates (phi)",
                days=None,
                held_by=decl.controller.name,
                source=update_retention(files),
            ),
        ],
        measures=measures(files, None, audit_ok),
    )


def processed(files: RunFiles) -> set[str]:
    """The sites that trained in at least one round of the run (they processed data)."""
    return {str(s) for m in files.round_lines for s in (m.get("used") or [])}


def _documents(registry: PartyRegistry | None, entity_id: str | None) -> list[str]:
    if registry is None or entity_id is None:
        return []
    return [
        f"{DOCUMENT_NAMES[d.kind]} {d.ref}"
        + (f" (module {d.scc_module})" if d.scc_module else "")
        + f": signed {d.signed_on}, "
        + (f"expires {d.expires_on}" if d.expires_on else "no expiry date")
        for d in registry.documents
        if entity_id in d.parties
    ]


def with_registry(files: RunFiles, rec: ProcessingRecord) -> ProcessingRecord:
    """``rec`` linked to its party in the run's registry: entity id, documents on file,
    the Art. 27 representative and the DPO where the registry names them."""
    registry = files.declaration.registry
    if registry is None:
        return rec
    if rec.party.site_id is not None:
        m = files.sites[rec.party.site_id].manifest
        party = registry.party_of_site(rec.party.site_id, m.legal_entity_id if m else None)
    else:
        party = registry.coordinator()
    if party is None:
        return rec
    update: dict = {
        "entity_id": party.entity_id,
        "documents": _documents(registry, party.entity_id),
    }
    if party.art27_representative:
        update["representative"] = party.art27_representative
    elif not is_eea(party.country):
        update["representative"] = (
            "NOT DECLARED: a party outside the EEA processing under "
            "GDPR needs a representative in the Union (Art. 27)"
        )
    if rec.party.dpo is None and party.dpo_contact:
        update["party"] = rec.party.model_copy(update={"dpo": party.dpo_contact})
    return rec.model_copy(update=update)


def records_of_processing(
    files: RunFiles, audit_ok: bool, scope: str | None
) -> list[ProcessingRecord]:
    """Art. 30 records: the coordinator's and one per party whose site processed data in
    this run (trained in a round); sites that never trained have no record here."""
    out = [] if scope is not None else [server_record(files, audit_ok)]
    trained = processed(files)
    for s in files.sites.values():
        if scope is None and (s.site_id not in files.eligible or s.site_id not in trained):
            continue
        rec = site_record(files, s, audit_ok, scope)
        if rec is not None:
            out.append(rec)
    return [with_registry(files, r) for r in out]
