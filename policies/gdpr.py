"""GDPR (Regulation (EU) 2016/679) rules.

Each class is one rule; ``policies/registry.py`` lists them in evaluation order.
``confidence`` says how firmly the reading rests on the text (see docs/compliance.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from policies.countries import adequacy_list, country_name, is_eea
from policies.declarations import (
    ART9_NAMES,
    GDPR_BASIS_NAMES,
    SCC_PATTERN,
    RunDeclaration,
    SiteManifest,
    law_jurisdiction,
)
from policies.purposes import get_purpose
from policies.records import RecordMeta
from policies.rule import Columns, Decision, RecordRule, RunRule, SiteRule


def transfer_ground(country: str, safeguards: Iterable[str]) -> tuple[str | None, str]:
    """Why personal data may go to ``country`` under GDPR Chapter V, or (None, why not).

    Allowed when the country is in the EEA (no third-country transfer), has a
    full adequacy decision (Art. 45), has a partial one and the sender confirms
    the recipient is within its scope ("adequacy" among the safeguards), or an
    SCC module of Decision 2021/914 is in place (Art. 46(2)(c)).
    """
    safeguards = tuple(safeguards)
    sccs = [s for s in safeguards if SCC_PATTERN.match(s)]
    name = f"{country_name(country)} ({country})"
    if is_eea(country):
        return "in the EEA (no third-country transfer)", ""
    adequacy = adequacy_list().countries.get(country)
    note = f" (note: {adequacy.note})" if adequacy is not None and adequacy.note else ""
    if adequacy is not None and not adequacy.partial:
        return (
            f"{name} has an adequacy decision (Art. 45), list as of {adequacy_list().as_of}{note}",
            "",
        )
    if adequacy is not None and "adequacy" in safeguards:
        return (
            f"{name} adequacy decision, recipient confirmed within its scope "
            f"({adequacy.scope}){note}",
            "",
        )
    if sccs:
        return f"standard contractual clauses {sccs[0]} (Art. 46(2)(c))", ""
    if adequacy is not None:
        return None, (
            f"{name}'s adequacy decision covers only {adequacy.scope}: confirm the recipient is "
            f"in scope (transfer_safeguards = ['adequacy']) or declare an SCC reference{note}"
        )
    return None, (
        f"{name} is neither in the EEA nor on the adequacy list "
        f"(as of {adequacy_list().as_of}) and no SCC reference is declared"
    )


# ---- run level --------------------------------------------------------------


class ModelTransfer(RunRule):
    id = "GDPR-44-MODEL"
    pack = "gdpr"
    references = ("GDPR Art. 44", "GDPR Art. 45", "GDPR Art. 46(2)(c)")
    confidence = "V/S (U: treating the model as personal data, per EDPB Opinion 28/2024)"
    description = (
        "The global model is trained in part on data of sites under GDPR and is not presumed "
        "anonymous (EDPB Opinion 28/2024), so sending it to a site in a third country is a "
        "transfer: that site must be in the EEA, in an adequate country, or covered by SCCs it "
        "declares. (interpretation)"
    )

    def evaluate(self, run: RunDeclaration, sites: Sequence[SiteManifest]) -> list[Decision]:
        gdpr_sites = [s.site_id for s in sites if "gdpr" in s.law_packs]
        if not gdpr_sites:
            return [self.allow("no site under GDPR takes part: the model carries no GDPR data")]
        decisions = []
        for site in sites:
            ground, why_not = transfer_ground(site.country, site.transfer_safeguards)
            if ground is None:
                decisions.append(self.deny(f"model to site: {why_not}", site))
            else:
                decisions.append(self.allow(f"model to site: {ground}", site))
        return decisions


# ---- site level -------------------------------------------------------------


class LawfulBasis(SiteRule):
    id = "GDPR-6"
    pack = "gdpr"
    references = ("GDPR Art. 6(1)", "GDPR Art. 6(3)")
    confidence = "V/K"
    description = (
        "Each controller needs its own lawful basis of Art. 6(1) (a) to (f): the site's own "
        "(lawful_basis), else the run's. A basis of (c) legal obligation or (e) public task must "
        "name the Union or Member State law behind it (Art. 6(3), art6_3_law), in force in the "
        "site's country. Legitimate interests (f) needs a reference to the balancing test."
    )

    def evaluate(
        self, run: RunDeclaration, site: SiteManifest, columns: Columns | None = None
    ) -> Decision:
        basis = site.lawful_basis or run.lawful_basis
        if basis is None:
            return self.deny(
                "neither the site nor the run declares a lawful basis (Art. 6(1)(a)-(f))", site
            )
        whose = "the site's" if site.lawful_basis else "the run's"
        if basis == "f" and run.legitimate_interests_assessment is None:
            return self.deny(
                "Art. 6(1)(f) legitimate interests needs legitimate_interests_assessment "
                "(the balancing test) in the run declaration",
                site,
            )
        law = ""
        if basis in ("c", "e"):
            if site.art6_3_law is None:
                return self.deny(
                    f"Art. 6(1)({basis}) {GDPR_BASIS_NAMES[basis]} needs the law that lays it "
                    "down (Art. 6(3)): set art6_3_law = 'XX: <citation>' in the site manifest",
                    site,
                )
            where = law_jurisdiction(site.art6_3_law)
            if where not in ("EU", site.country):
                return self.deny(
                    f"the Art. 6(3) law {site.art6_3_law!r} is {where} law but the site is in "
                    f"{site.country}: name the law that applies to the site",
                    site,
                )
            law = f"; law: {site.art6_3_law}"
        return self.allow(
            f"Art. 6(1)({basis}) {GDPR_BASIS_NAMES[basis]} ({whose} basis){law}", site
        )


class SpecialCategories(SiteRule):
    id = "GDPR-9-2"
    pack = "gdpr"
    references = ("GDPR Art. 9(1)", "GDPR Art. 9(2)", "GDPR Art. 9(3)", "GDPR Art. 89(1)")
    confidence = "V/S (U: which conditions fit which purpose)"
    description = (
        "Health, genetic, biometric and other Art. 9(1) data need an Art. 9(2) condition, the "
        "site's own (art9_condition) or else the run's: (a) explicit consent, (g) substantial "
        "public interest, (h) care, (i) public health or (j) research. (g) to (j) must name the "
        "Union or Member State law relied on (art9_law), in force in the site's country; (h) "
        "also needs the Art. 9(3) secrecy obligation (art9_3_secrecy). The condition must fit "
        "the run's purpose (e.g. (h) is for care, not research) (interpretation)."
    )

    def evaluate(
        self, run: RunDeclaration, site: SiteManifest, columns: Columns | None = None
    ) -> Decision:
        special = sorted(site.special_categories)
        if not special:
            return self.allow("no special-category data at this site", site)
        condition = site.art9_condition or run.special_category_condition
        what = ", ".join(special)
        if condition is None:
            return self.deny(
                f"site holds {what} data but neither the site (art9_condition) nor the run "
                "declares an Art. 9(2) condition",
                site,
            )
        purpose = get_purpose(run.purpose)
        if condition not in purpose.art9_conditions:
            fits = ", ".join(f"({c})" for c in purpose.art9_conditions)
            return self.deny(
                f"Art. 9(2)({condition}) does not fit purpose {purpose.id} (fits: {fits})", site
            )
        if condition == "a":  # explicit consent: no law to cite
            return self.allow(f"{what} data under Art. 9(2)(a) {ART9_NAMES['a']}", site)
        law = site.art9_law
        if law is None:
            return self.deny(
                f"Art. 9(2)({condition}) requires the Union or Member State law the site relies "
                "on: set art9_law = 'XX: <citation>' in the site manifest",
                site,
            )
        where = law_jurisdiction(law)
        if where not in ("EU", site.country):
            return self.deny(
                f"the Art. 9(2)({condition}) law {law!r} is {where} law but the site is in "
                f"{site.country}: name the law that applies to the site",
                site,
            )
        if condition == "h" and site.art9_3_secrecy is None:
            return self.deny(
                "Art. 9(2)(h) needs processing by or under the responsibility of a professional "
                "under a duty of secrecy (Art. 9(3)): state it in art9_3_secrecy",
                site,
            )
        return self.allow(
            f"{what} data under Art. 9(2)({condition}) {ART9_NAMES[condition]}; law: {law}", site
        )


class PurposeLimitation(SiteRule):
    id = "GDPR-5-1-b"
    pack = "gdpr"
    references = ("GDPR Art. 5(1)(b)",)
    confidence = "S"
    description = "The run's purpose must be one the site has approved."

    def evaluate(
        self, run: RunDeclaration, site: SiteManifest, columns: Columns | None = None
    ) -> Decision:
        if run.purpose in site.approved_purposes:
            return self.allow(f"purpose {run.purpose} is approved by the site", site)
        return self.deny(f"purpose {run.purpose} is not among the site's approved purposes", site)


class DataMinimisation(SiteRule):
    id = "GDPR-5-1-c"
    pack = "gdpr"
    references = ("GDPR Art. 5(1)(c)", "GDPR Art. 25(2)")
    confidence = "V"
    description = (
        "The trainer may read only the feature columns the site declares; any other column "
        "denies the site. Checked at the node, which knows what the trainer will read."
    )

    def evaluate(
        self, run: RunDeclaration, site: SiteManifest, columns: Columns | None = None
    ) -> Decision | None:
        if columns is None:
            return None
        if not columns.declared:
            return self.deny(
                "the site declares no feature columns: list them in feature_columns", site
            )
        extra = sorted(set(columns.read) - set(columns.declared))
        if extra:
            return self.deny(f"reads undeclared columns: {', '.join(extra)}", site)
        return self.allow(f"reads {len(set(columns.read))} declared column(s) only", site)


class Transfers(SiteRule):
    id = "GDPR-44"
    pack = "gdpr"
    references = ("GDPR Art. 44", "GDPR Art. 45", "GDPR Art. 46(2)(c)")
    confidence = "V/S"
    description = (
        "The site's model updates go to the server's country: allowed if it is in the EEA, has "
        "an adequacy decision (policies/data/adequacy.toml), or an SCC reference is declared "
        "(by the run or the site); denied otherwise."
    )

    def evaluate(
        self, run: RunDeclaration, site: SiteManifest, columns: Columns | None = None
    ) -> Decision:
        safeguards = tuple(site.transfer_safeguards)
        if run.scc_reference is not None:
            safeguards += (run.scc_reference,)
        ground, why_not = transfer_ground(run.server_country, safeguards)
        if ground is None:
            return self.deny(f"updates to server: {why_not}", site)
        return self.allow(f"updates to server: {ground}", site)


# ---- record level (in registry order: erasure, consent, children, storage) ---


def consent_is_the_basis(run: RunDeclaration, site: SiteManifest) -> bool:
    """Art. 6(1)(a) is the basis, or Art. 9(2)(a) covers the site's special-category data."""
    basis = site.lawful_basis or run.lawful_basis
    condition = site.art9_condition or run.special_category_condition
    explicit = condition == "a" and bool(site.special_categories)
    return basis == "a" or explicit


class Erasure(RecordRule):
    id = "GDPR-17"
    pack = "gdpr"
    references = ("GDPR Art. 17(1)",)
    confidence = "V (U: effect on models already trained)"
    description = (
        "A record whose data subject asked for erasure is left out of every round from the "
        "request on, and counted. Models trained before the request are not unlearned: the "
        "report must record that (Art. 17(3)(d) or retraining). (interpretation)"
    )
    excluded_because = "erasure requested"

    def excludes(
        self, record: RecordMeta, run: RunDeclaration, site: SiteManifest, at: datetime
    ) -> bool:
        return record.erasure_due(at)


class Objection(RecordRule):
    id = "GDPR-21"
    pack = "gdpr"
    references = ("GDPR Art. 21(1)", "GDPR Art. 21(6)")
    confidence = "V (U: the record field holds objections the site upheld)"
    description = (
        "Where the site relies on public task (e) or legitimate interests (f) (Art. 21(1)), or "
        "the purpose is research (Art. 21(6)), a data subject may object. A record whose "
        "objection the site upheld (objected_at) is left out from the objection on. An "
        "objection the site refuses on compelling grounds or public-interest necessity is "
        "recorded with its ground in the site's rights register, not in objected_at. "
        "(interpretation)"
    )
    applies_when = "the basis is (e) or (f), or the purpose is research"
    excluded_because = "the data subject objected (upheld)"

    def applies(self, run: RunDeclaration, site: SiteManifest) -> bool:
        basis = site.lawful_basis or run.lawful_basis
        return basis in ("e", "f") or get_purpose(run.purpose).is_research

    def excludes(
        self, record: RecordMeta, run: RunDeclaration, site: SiteManifest, at: datetime
    ) -> bool:
        return record.objected_by(at)


class Restriction(RecordRule):
    id = "GDPR-18"
    pack = "gdpr"
    references = ("GDPR Art. 18(1)", "GDPR Art. 18(2)")
    confidence = "V"
    description = (
        "While processing of a record is restricted (restricted_at; lifting the restriction "
        "clears it), the record may only be stored: it is left out of training."
    )
    excluded_because = "processing restricted"

    def excludes(
        self, record: RecordMeta, run: RunDeclaration, site: SiteManifest, at: datetime
    ) -> bool:
        return record.restricted_by(at)


class NationalOptOut(RecordRule):
    id = "GDPR-OPT-OUT"
    pack = "gdpr"
    references = ("GDPR Art. 9(4)",)
    confidence = "S (U: which schemes cover model training)"
    description = (
        "A record whose data subject opted out under a national opt-out scheme (opted_out_at; "
        "the scheme the site applies is its opt_out_scheme, e.g. a national data opt-out or, "
        "from 2029, the European Health Data Space opt-out from secondary use) is left out "
        "from the opt-out on. (interpretation)"
    )
    excluded_because = "opted out under a national scheme"

    def excludes(
        self, record: RecordMeta, run: RunDeclaration, site: SiteManifest, at: datetime
    ) -> bool:
        return record.opted_out_by(at)


class Consent(RecordRule):
    id = "GDPR-7-3"
    pack = "gdpr"
    references = ("GDPR Art. 6(1)(a)", "GDPR Art. 7(1)", "GDPR Art. 7(3)", "GDPR Art. 9(2)(a)")
    confidence = "V"
    description = (
        "When the basis is consent, a record is used only if its data subject consented to this "
        "purpose and has not withdrawn; a withdrawal at or before the round time excludes the "
        "record from that round and all later ones (earlier processing stays lawful)."
    )
    applies_when = "the lawful basis is consent (Art. 6(1)(a) or 9(2)(a))"
    excluded_because = "no consent for this purpose, or consent withdrawn"

    def applies(self, run: RunDeclaration, site: SiteManifest) -> bool:
        return consent_is_the_basis(run, site)

    def excludes(
        self, record: RecordMeta, run: RunDeclaration, site: SiteManifest, at: datetime
    ) -> bool:
        return run.purpose not in record.consented_purposes or record.withdrawn_by(at)


class Children(RecordRule):
    id = "GDPR-8"
    pack = "gdpr"
    references = ("GDPR Art. 8(1)",)
    confidence = "V"
    description = (
        "Where the run's purpose is an information-society service offered directly to a "
        "child (Art. 8 covers nothing else), records of data subjects under the site's age of "
        "digital consent (gdpr_child_age, 16 unless the Member State set 13-15) are left out "
        "unless a parent or guardian consented. Research and care on minors follow the site's "
        "national law instead (GDPR-MINORS)."
    )
    applies_when = "the purpose is an information-society service"
    excluded_because = "child under the site's age of digital consent without guardian consent"

    def applies(self, run: RunDeclaration, site: SiteManifest) -> bool:
        return get_purpose(run.purpose).is_information_society_service

    def excludes(
        self, record: RecordMeta, run: RunDeclaration, site: SiteManifest, at: datetime
    ) -> bool:
        return record.is_child(site.gdpr_child_age) and not record.guardian_consent


class MinorsNationalLaw(RecordRule):
    id = "GDPR-MINORS"
    pack = "gdpr"
    references = ("GDPR Art. 9(4)", "GDPR Art. 89(1)")
    confidence = "S (U: national law varies; the site declares it)"
    description = (
        "At a site whose data subjects include minors, a record of a minor under the site's "
        "national law (minor_age, 18 unless the site declares otherwise; minors_law names the "
        "law) is left out unless a parent or guardian consented, where that law needs it "
        "(minors_need_guardian_consent). (interpretation)"
    )
    applies_when = "the site's data subjects include minors"
    excluded_because = "minor under the site's national law without guardian consent"

    def applies(self, run: RunDeclaration, site: SiteManifest) -> bool:
        return site.has_minors and site.minors_need_guardian_consent

    def excludes(
        self, record: RecordMeta, run: RunDeclaration, site: SiteManifest, at: datetime
    ) -> bool:
        return record.is_child(site.minor_age) and not record.guardian_consent


class StorageLimitation(RecordRule):
    id = "GDPR-5-1-e"
    pack = "gdpr"
    references = ("GDPR Art. 5(1)(e)",)
    confidence = "V"
    description = (
        "Records collected longer ago than the site's retention limit (retention_days) are left "
        "out. Records with no collection date are handled by PRIV-DATE-UNKNOWN."
    )
    excluded_because = "older than the site's retention limit"

    def excludes(
        self, record: RecordMeta, run: RunDeclaration, site: SiteManifest, at: datetime
    ) -> bool:
        return record.older_than(site.retention_days, at)
