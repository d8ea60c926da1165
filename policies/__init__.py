"""fedmeta policies: which uses of data the law allows, as small readable rules.

This package is plain Python (stdlib, pydantic, tomllib). It imports nothing of
torch, Flower or the rest of fedmeta, so a data protection officer can read a
rule without knowing machine learning. It is an engineering checklist, not
legal advice; where a rule is fedmeta's reading of the law rather than its
text, its description says "(interpretation)".

Declarations
    A run declares its purpose, lawful basis, controllers, server country, DP
    guarantee and retention (:class:`RunDeclaration`, ``run.toml``); each site
    declares who it is, what data it holds, which purposes it approves, its
    basis, retention, transfer safeguards, privacy limits and law packs
    (:class:`SiteManifest`, ``site.toml``); each record carries pseudonymous
    metadata (:class:`RecordMeta`). Loading a bad file raises
    :class:`DeclarationError` with one line naming the file, field and fix.

Validation (``validation.py``)
    :func:`format_validation_error` turns any pydantic error into that one line;
    :data:`SiteId` and :data:`Country` are the one definition of a site id and
    of an ISO 3166-1 alpha-2 country code. All of fedmeta uses them.

Rules and decisions
    A rule (``policies/rule.py``) has an ``id`` such as ``GDPR-9-2``, legal
    ``references`` such as "GDPR Art. 9(2)(j)", a plain ``description`` and a
    ``level``: run, round, site or record. It returns a :class:`Decision`:
    allow, allow-with-exclusions or deny, with a one-line reason, counts of
    excluded records by rule and flags (``conflict``, ``non-private``). Masks of
    excluded records stay on the node; ``Decision.to_dict()`` carries counts.

    Rules live one family per file (``gdpr.py``, ``dpdp.py``, ``privacy.py``);
    ``registry.py`` lists them in evaluation order and groups them into packs.
    A site gets the packs in ``site.law_packs`` plus ``privacy``.

Gates (``gates.py``)
    Run rules evaluated last, by the server, over the sites every other rule
    left eligible: the party registry and its agreements (``GDPR-26-28``,
    ``parties.py``: ``[registry]`` in the run declaration) and the DPIA
    (``GDPR-35``, ``dpia.py``: ``dpia_file`` names a versioned ``dpia.toml``,
    approved, current and covering the run's sites, countries, purpose, epsilon
    and transport). A gate's denial names no site: the whole run is refused.

Entry points::

    decisions = evaluate_run(run, sites, transport=t)     # server, before sampling
    decisions = evaluate_site(run, site, read_columns=cols) # node, before training
    verdict = evaluate_records(run, site, records, at)      # node, each round
    verdict.allowed_mask, verdict.excluded_by_rule, verdict.n_allowed
    check_min_sites(run, n_sites)                           # server, each round

How to add a rule
    1. In the family's file, subclass ``SiteRule``, ``RecordRule``, ``RunRule``
       or ``RoundRule``; set ``id``, ``pack``, ``references``, ``description``
       and ``confidence`` (docs/compliance.md); write its
       one method (``evaluate``, or ``applies``/``excludes`` for records) using
       ``self.allow(...)``/``self.deny(...)``.
    2. Add an instance to ``_RULES`` in ``registry.py`` where it should run
       (for record rules, the position decides where overlapping exclusions
       are counted).
    3. Add a test with one allowing and one denying or excluding case under
       ``tests/policies/``.
"""

from policies.commencement import LegalStatus, in_force_from, legal_status
from policies.declarations import (
    SPECIAL_CATEGORIES,
    DeclarationError,
    Party,
    RunDeclaration,
    SiteManifest,
    load_run_declaration,
    load_site_manifest,
    parse_run_declaration,
    parse_site_manifest,
)
from policies.defaults import (
    EXAMPLE_RUN,
    EXAMPLE_SITE,
    EXAMPLE_SITE_IN,
    EXAMPLES_DIR,
    default_site_manifest,
    example_run_declaration,
    example_site_manifest,
)
from policies.engine import (
    RecordsVerdict,
    check_min_sites,
    eligible_sites,
    evaluate_records,
    evaluate_run,
    evaluate_site,
    suppress_small_counts,
)
from policies.purposes import PURPOSES, Purpose, get_purpose
from policies.records import RecordMeta, records_from_columns
from policies.registry import PACKS, RULES, rules_for
from policies.rule import (
    CONFLICT,
    NON_PRIVATE,
    Decision,
    Level,
    Outcome,
    RecordRule,
    RoundRule,
    Rule,
    RunRule,
    SiteRule,
)
from policies.validation import Country, SiteId, format_validation_error

__all__ = [
    "LegalStatus",
    "in_force_from",
    "legal_status",
    "CONFLICT",
    "Country",
    "EXAMPLES_DIR",
    "EXAMPLE_RUN",
    "EXAMPLE_SITE",
    "EXAMPLE_SITE_IN",
    "NON_PRIVATE",
    "PACKS",
    "PURPOSES",
    "RULES",
    "SPECIAL_CATEGORIES",
    "Decision",
    "DeclarationError",
    "Level",
    "Outcome",
    "Party",
    "Purpose",
    "RecordMeta",
    "RecordRule",
    "RecordsVerdict",
    "RoundRule",
    "Rule",
    "RunDeclaration",
    "RunRule",
    "SiteManifest",
    "SiteId",
    "SiteRule",
    "check_min_sites",
    "default_site_manifest",
    "eligible_sites",
    "evaluate_records",
    "evaluate_run",
    "evaluate_site",
    "example_run_declaration",
    "example_site_manifest",
    "get_purpose",
    "load_run_declaration",
    "load_site_manifest",
    "parse_run_declaration",
    "parse_site_manifest",
    "records_from_columns",
    "rules_for",
    "format_validation_error",
    "suppress_small_counts",
]
