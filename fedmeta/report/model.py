"""The compliance report as data: one pydantic model, one canonical JSON.

Everything the renderers show is in :class:`Report`; the templates only lay it
out. ``schema.json`` beside this file is ``Report.model_json_schema()`` (a test
keeps it in step), so a machine can validate a report without fedmeta.

Counts about people (records excluded, erasure requests ...) are :data:`Count`:
an int, or ``"<k"`` when the count is between 1 and the site's minimum cohort
size minus one (``policies.suppress_small_counts``), or ``"withheld"`` when
showing it would reveal a suppressed count (a total whose parts are suppressed).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = "fedmeta.report/2"

Count = int | str
"""A count of records or people; ``"<k"`` or ``"withheld"`` when suppressed."""

Status = Literal["on", "off", "partial", "not applicable", "not recorded"]
Severity = Literal["error", "warning", "info"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Scope(_Model):
    kind: Literal["federation", "site"]
    site_id: str | None = None
    """For a site report: the only site whose data it holds."""


class Finding(_Model):
    """Something a data protection officer should look at, in one line.

    Findings that differ only in the site they name are grouped into one, which names
    the number of sites and lists them in ``sites``."""

    severity: Severity
    section: str
    message: str
    sites: list[str] = Field(default_factory=list)
    """The sites a grouped finding is about (empty: the run as a whole, or one site named
    in the message)."""


class SignOff(_Model):
    """One line of the sign-off block: filled in by hand on the printed report."""

    role: str
    decides: str


class Summary(_Model):
    """Page one: go / no-go, the top findings in plain words, who signs."""

    verdict: Literal["NO-GO", "GO WITH CONDITIONS", "GO"]
    """NO-GO: an error finding (evidence failed, DP off, a gate refused the run);
    GO WITH CONDITIONS: warnings a person must resolve; GO: nothing found."""
    why: str
    facts: list[str]
    """Key facts of the run in one line each (purpose, sites, rounds, privacy, DPIA)."""
    top_findings: list[str]
    """At most five findings, most severe first, in plain words (no rule ids)."""
    more_findings: int
    """How many further findings the full list (section 1) holds."""
    sign_off: list[SignOff]


class RuleAnnexRow(_Model):
    """One rule as the annex lists it: what the law says, what fedmeta checks."""

    rule_id: str
    pack: str
    level: str
    references: list[str]
    checks: str
    """What fedmeta checks, in words (the rule's description)."""
    interpretation: bool
    """True where the mapping from the provision to the check is fedmeta's reading."""
    confidence: str
    legal_status: str
    """On the report's date: binding, readiness (applies from ...) or partly in force."""


class RunSummary(_Model):
    run_id: str
    purpose: str
    purpose_description: str
    task: str
    strategy: str
    rounds_planned: int
    rounds_run: int
    sites_configured: int
    sites_eligible: int | None = None
    sites_denied: int | None = None
    started_at: str | None
    ended_at: str | None
    model_sha256: str | None
    dp: bool
    declared_epsilon: float | None
    """The sample-level epsilon the run declares each site spends over the run."""
    declared_delta: float | None
    stopped: str | None
    transport: str
    config_sha256: str | None
    declaration_sha256: str | None
    declaration_id: str | None
    dpia_id: str | None


class Party(_Model):
    name: str
    role: str
    country: str
    contact: str | None = None
    dpo: str | None = None
    site_id: str | None = None
    source: str
    """Where fedmeta learned of the party: the run declaration or a site manifest."""


# ---- GDPR Art. 30 ---------------------------------------------------------------------


class DataCategory(_Model):
    category: str
    special: bool
    """A special category of GDPR Art. 9(1)."""


class Transfer(_Model):
    data: str
    origin: str
    destination: str
    ground: str
    decision: str
    rule_id: str | None = None


class Retention(_Model):
    item: str
    days: int | None
    held_by: str
    source: str


class Measure(_Model):
    measure: str
    status: Status
    detail: str


class ProcessingRecord(_Model):
    """One record of processing: GDPR Art. 30(1) (controller) or 30(2) (processor)."""

    article: Literal["30(1)", "30(2)"]
    party: Party
    joint_controllers: list[str]
    representative: str
    purposes: list[str]
    legal_basis: list[str]
    data_subjects: list[str]
    data_categories: list[DataCategory]
    recipients: list[str]
    transfers: list[Transfer]
    retention: list[Retention]
    measures: list[Measure]
    controllers_served: list[str] = Field(default_factory=list)
    """Art. 30(2)(a): the controllers a processor acts for."""
    processing_categories: list[str] = Field(default_factory=list)
    """Art. 30(2)(b): the categories of processing carried out for them."""
    entity_id: str | None = None
    """The party's legal entity id in the run's party registry."""
    documents: list[str] = Field(default_factory=list)
    """The signed documents on file for the party (Art. 26, 28, SCCs), with their dates."""


# ---- DPIA (Art. 35(7)) -------------------------------------------------------------------


class RiskCriterion(_Model):
    criterion: str
    source: str
    applies: Literal["yes", "no", "unknown"]
    evidence: str


class Risk(_Model):
    risk: str
    description: str
    mitigations: list[str]
    residual: str
    references: list[str]


class AssessedRisk(_Model):
    """A risk as the DPIA record rates it (EDPB template: inherent risk, measures,
    residual risk); likelihood x severity on the ICO scale."""

    id: str
    risk: str
    description: str
    inherent: str
    """e.g. "high (probable x severe)"."""
    measures: list[str]
    residual: str


class DpiaRecordView(_Model):
    """The DPIA record the run declaration carries (dpia.toml) and whether it covers the run."""

    dpia_id: str
    version: int
    title: str
    status: str
    decision: str | None
    conditions: list[str]
    decided_by: str | None
    decided_on: str | None
    dpo_advice: str | None
    dpo_advice_date: str | None
    dpo_advice_followed: bool | None
    data_subjects_views: str | None
    review_date: str
    review_triggers: list[str]
    scope: str
    gate: str
    """The DPIA gate's (GDPR-35) decision on this run: current, stale or not approved."""
    gate_ok: bool
    risks: list[AssessedRisk]


class Dpia(_Model):
    dpia_id: str | None
    required: str
    description: list[str]
    """Art. 35(7)(a): systematic description of the processing and its purposes."""
    necessity: list[str]
    """Art. 35(7)(b): necessity and proportionality."""
    criteria: list[RiskCriterion]
    """WP248 rev.01 criteria and Art. 35(3)(b), as they apply to this run."""
    risks: list[Risk]
    """Art. 35(7)(c)-(d): risks and the measures this run had against them."""
    to_complete: list[str]
    """What the data cannot tell: for the controller and the DPO to fill in."""
    record: DpiaRecordView | None = None
    """The versioned DPIA the run relied on, if its declaration carries one."""


# ---- privacy statements -----------------------------------------------------------------


class LedgerPoint(_Model):
    run: str
    round: int
    epsilon_after: float
    this_run: bool


class SitePrivacy(_Model):
    site_id: str
    dp: bool
    privacy_unit: str
    accountant: str | None
    delta: float | None
    epsilon_run: float | None
    """Epsilon of this run's releases alone (composed over its rounds)."""
    epsilon_total: float | None
    """Epsilon over every release the site ever made (all runs), from its ledger."""
    epsilon_max: float | None
    budget_left: float | None
    noise_multipliers: list[float]
    sample_rates: list[float]
    steps_per_round: list[int]
    steps_total: int
    clip_norm: float | None
    rounds_joined: list[int]
    rounds_declined: list[int]
    earlier_charges: int
    """Ledger entries from earlier runs (they count towards epsilon_total)."""
    statement: str
    points: list[LedgerPoint]
    unsigned_fields: list[str] = []
    """Ledger figures this site's signed log does not hold (shown, but not verified)."""
    noise_source: str | None = None
    """Where the site's DP noise came from, as it signed: ``site-csprng`` (its own secret)
    or ``seeded`` (from the run seed: simulations only)."""
    site_policy_sha256: str | None = None
    """The privacy policy the site enforced this run (hash it signed in round.train)."""
    declaration_sha256: str | None = None
    """The run declaration the site approved and trained under (hash it signed)."""
    run_epsilon_cap: float | None = None
    """The per-run epsilon the site enforced (the smaller of its policy and the declaration)."""
    epsilon_before: float | None = None
    """Epsilon the site had spent in earlier runs before this one (ledger)."""
    plain: str = ""
    """The guarantee in one plain-language sentence (odds ratio e^epsilon)."""
    warnings: list[str] = Field(default_factory=list)
    """Epsilon above the report's warning level, delta above 1/n, ..."""


# ---- policy decisions ----------------------------------------------------------------------


class DecisionRow(_Model):
    rule_id: str
    outcome: str
    level: str
    site_id: str | None
    references: list[str]
    reason: str
    flags: list[str]
    source: str
    rounds: list[int] = Field(default_factory=list)
    legal_status: str = "binding"
    """On the report's date: binding, readiness (the provisions apply later) or partly
    in force, with the date the rest applies from (policies/data/commencement.toml)."""


class DecisionGroup(_Model):
    """Site decisions that are the same at several sites (same rule, outcome, reason,
    rounds), shown once with the sites listed."""

    rule_id: str
    outcome: str
    sites: list[str]
    rounds: list[int]
    references: list[str]
    reason: str
    flags: list[str]
    legal_status: str = "binding"


class ExclusionRow(_Model):
    site_id: str
    rule_id: str
    references: list[str]
    description: str
    count: Count
    """Records excluded by this rule in the last round the site evaluated."""
    first_round: int
    rounds: list[int]


class ExclusionTotal(_Model):
    rule_id: str
    references: list[str]
    count: Count


class RightsHandling(_Model):
    """Erasure requests and consent (missing or withdrawn) handled at one site."""

    site_id: str
    kind: Literal["erasure", "consent", "objection", "restriction", "opt-out"]
    rule_id: str
    references: list[str]
    count: Count
    excluded_from_round: int
    note: str


class RightsRegisterRow(_Model):
    """Requests of one type and decision in a site's own rights register (counts only)."""

    site_id: str
    type: str
    decision: str
    count: Count
    source: str


class Decline(_Model):
    site_id: str
    round: int
    action: str
    rule_ids: list[str]
    reason: str


class PolicySection(_Model):
    min_cohort_size: dict[str, int]
    run_decisions: list[DecisionRow]
    site_decisions: list[DecisionRow]
    site_decision_groups: list[DecisionGroup] = Field(default_factory=list)
    """``site_decisions`` grouped across sites (what the HTML and Markdown show)."""
    exclusions: list[ExclusionRow]
    exclusion_totals: list[ExclusionTotal]
    records_evaluated: dict[str, Count]
    rights: list[RightsHandling]
    rights_register: list[RightsRegisterRow] = Field(default_factory=list)
    """Counts from each site's rights register, where it keeps one (unsigned)."""
    rights_overdue: dict[str, Count] = Field(default_factory=dict)
    """Site -> requests answered late or still pending past the legal deadline."""
    declines: list[Decline]
    denied_sites: dict[str, str]
    unusable_sites: dict[str, str]
    """Nodes the server could not use (no identity or an unreadable manifest)."""


# ---- DPDP --------------------------------------------------------------------------------------


class DpdpSite(_Model):
    site_id: str
    ground: str
    legitimate_use: str
    research_exemption: str | None
    children: str
    children_excluded: Count
    transfers: str
    site_log_retention_days: int
    server_log_retention_days: int
    required_log_retention_days: int
    log_retention_conflict: bool
    log_retention: str
    decisions: list[DecisionRow]


class DpdpSection(_Model):
    in_force: str
    sites: list[DpdpSite]


# ---- learning ----------------------------------------------------------------------------------


class EvalPoint(_Model):
    round: int
    adapted: float | None
    adapted_ci95: float | None
    unadapted: float | None
    episodes: int | None
    shots: int | None
    n_way: int | None


class RoundRow(_Model):
    round: int
    model_sha256: str | None
    beta: float | None
    sampled: int | None = None
    used: int | None = None
    declined: int | None = None
    dropped: int | None = None
    lost: int | None = None
    site_status: str | None = None
    """For a site report: what this site did in the round."""


class ShotsPoint(_Model):
    """One point of ``fedmeta evaluate``'s curve: a method's score at K shots per class."""

    method: str
    label: str
    shots: int
    mean: float
    ci95: float
    lr: float | None
    episodes: int
    shift: bool = False


class LearningSection(_Model):
    metric: str | None
    task: str
    strategy: str
    points: list[EvalPoint]
    baseline_run_id: str | None
    baseline_strategy: str | None
    baseline_points: list[EvalPoint]
    rounds: list[RoundRow]
    shots_curve: list[ShotsPoint] = []
    """``fedmeta evaluate``'s curve saved in the run directory (shots-curve.json), if any."""
    evidence: str = "unsigned"
    """``signed by the server`` when metrics.jsonl is the file the server's run.end
    signed, else ``unsigned`` (the figures are what an unsigned file says)."""


# ---- audit ---------------------------------------------------------------------------------------


class ReceiptCheck(_Model):
    receipt: str
    ok: bool
    source: str


class LogCheck(_Model):
    log: str
    party: str
    status: Literal["verified", "self-asserted", "failed", "missing"]
    """``verified``: intact under a key given from outside the run (``--trust``);
    ``self-asserted``: intact under a key taken from the run directory itself, which
    whoever holds the directory could have replaced along with the log."""
    ok: bool
    entries: int
    head: str | None
    last_checkpoint: str | None
    key_pinned: bool
    key_source: Literal["trusted", "run directory", "embedded"] = "embedded"
    key_file: str | None
    key_fingerprint: str | None
    receipts: list[ReceiptCheck]
    problem: str | None


class CrossCheck(_Model):
    check: str
    ok: bool
    detail: str
    blocking: bool = True
    """A failed blocking check makes the report unverified; a non-blocking one is a warning."""
    fatal: bool = False
    """A failed fatal check stops the report even with ``--allow-unverified`` (the final
    model file is not the model the server signed)."""


class AuditSection(_Model):
    all_verified: bool
    logs: list[LogCheck]
    cross_checks: list[CrossCheck]


# ---- incidents ---------------------------------------------------------------------------------


class IncidentRow(_Model):
    """An incident of the run (``fedmeta incident``) with its legal clocks."""

    id: str
    kind: str
    site_id: str | None
    summary: str
    aware_at: str
    art33_deadline: str
    """GDPR Art. 33(1): 72 hours from awareness (the supervisory authority)."""
    dpdp_deadline: str | None
    """DPDP Rules r.7(2)(b): the Board's detailed report within 72 hours, where a DPDP site
    is concerned."""
    status: str
    reasons: str | None
    """The decision's reasons (GDPR Art. 33(5)), once decided."""


# ---- the report ----------------------------------------------------------------------------------


class Report(_Model):
    """A run's compliance report for a data protection officer."""

    evidence_basis: str
    """One line, first in every format: where the keys came from and what that means."""
    keys_trusted: bool
    """Every log present was checked against a key given from outside the run (--trust)."""
    unsigned: list[str] = []
    """Figures shown that no signed entry backs (e.g. ledger fields an older site log
    does not sign); the first line names them too."""
    schema_version: Literal["fedmeta.report/2"] = SCHEMA_VERSION
    report_id: str = ""
    """Short id of this report (hash of run, scope and generation time), on every page."""
    generated_at: str
    generator: str
    run_dir: str
    scope: Scope
    checks_passed: bool
    """Every audit log is intact and every cross-check agreed (under whatever keys)."""
    verified: bool
    """``checks_passed`` and ``keys_trusted``: never true for self-asserted evidence."""
    unverified_warning: str | None
    summary: Summary | None = None
    run: RunSummary
    parties: list[Party]
    records_of_processing: list[ProcessingRecord]
    shared_measures: list[Measure] = Field(default_factory=list)
    """Measures identical in every record of processing: shown once."""
    dpia: Dpia
    privacy: list[SitePrivacy]
    policy: PolicySection
    dpdp: DpdpSection | None
    learning: LearningSection
    audit: AuditSection
    findings: list[Finding]
    incidents: list[IncidentRow] = Field(default_factory=list)
    """Incidents opened from the run's signals and their notification decisions."""
    rules: list[RuleAnnexRow] = Field(default_factory=list)
    """Annex: every rule fedmeta applies, its provision and what it checks."""
    epsilon_warn: float | None = None
    """Epsilon above which a site's statement carries a warning (report option)."""
    disclaimer: str
