"""India: Digital Personal Data Protection Act 2023 (s.) and DPDP Rules 2025 (r.).

Each class is one rule; ``policies/registry.py`` lists them in evaluation order.
Confidence tags: see docs/compliance.md. Rule
numbers are those of the final Rules notified on 13 Nov 2025. Most provisions
apply only from 13 May 2027 (``policies/data/commencement.toml``): until then a
decision is "readiness", not binding law.
"""

from __future__ import annotations

from datetime import datetime

from policies.countries import country_name
from policies.declarations import DPDP_GROUND_NAMES, RunDeclaration, SiteManifest
from policies.purposes import get_purpose
from policies.records import RecordMeta
from policies.rule import CONFLICT, Columns, Decision, RecordRule, SiteRule

CHILD_AGE = 18
"""DPDP s.2(f): a child is an individual under eighteen."""

LOG_RETENTION_MIN_DAYS = 365
"""DPDP Rules 2025 r.6(1)(e) and r.8(3): logs kept at least one year."""


# ---- site level -------------------------------------------------------------


class LawfulGround(SiteRule):
    id = "DPDP-4"
    pack = "dpdp"
    references = (
        "DPDP Act 2023 s.4(1)",
        "DPDP Act 2023 s.6(1)",
        "DPDP Act 2023 s.7",
        "DPDP Act 2023 s.17(2)(b)",
    )
    confidence = "V (U: which s.7 uses fit which purpose; the s.17(2)(b) research route)"
    description = (
        "Personal data may be processed only on consent (s.6) or a legitimate use listed in s.7; "
        "GDPR's 'legitimate interests' is not a ground. A legitimate use must fit the run's "
        "purpose, and the s.17(2)(b) research exemption only fits research purposes "
        "(interpretation)."
    )

    def evaluate(
        self, run: RunDeclaration, site: SiteManifest, columns: Columns | None = None
    ) -> Decision:
        ground = site.dpdp_ground
        if ground is None:
            hint = (
                " (GDPR Art. 6(1)(f) legitimate interests has no DPDP equivalent)"
                if (site.lawful_basis == "f")
                else ""
            )
            return self.deny(
                f"the site declares no DPDP ground: set dpdp_ground to consent or an s.7 use{hint}",
                site,
            )
        purpose = get_purpose(run.purpose)
        if ground == "consent":
            return self.allow("consent (s.6)", site)
        if ground == "17(2)(b)":
            if purpose.is_research:
                return self.allow(f"{DPDP_GROUND_NAMES[ground]} for {purpose.id}", site)
            return self.deny(f"the s.17(2)(b) research exemption does not cover {purpose.id}", site)
        if ground in purpose.dpdp_uses:
            return self.allow(f"legitimate use: {DPDP_GROUND_NAMES[ground]}", site)
        return self.deny(
            f"legitimate use {DPDP_GROUND_NAMES[ground]} does not fit purpose {purpose.id}", site
        )


class PurposeLimitation(SiteRule):
    id = "DPDP-6-1"
    pack = "dpdp"
    references = ("DPDP Act 2023 s.5(1)", "DPDP Act 2023 s.6(1)")
    confidence = "V/S"
    description = (
        "Data are processed only for the specified purposes the site's notice and consent "
        "cover: the run's purpose must be one the site has approved."
    )

    def evaluate(
        self, run: RunDeclaration, site: SiteManifest, columns: Columns | None = None
    ) -> Decision:
        if run.purpose in site.approved_purposes:
            return self.allow(f"purpose {run.purpose} is approved by the site", site)
        return self.deny(f"purpose {run.purpose} is not among the site's approved purposes", site)


class NoTrackingOfChildren(SiteRule):
    id = "DPDP-9-3"
    pack = "dpdp"
    references = ("DPDP Act 2023 s.9(3)",)
    confidence = "V (U: scope for federated learning)"
    description = (
        "No tracking, behavioural monitoring or targeted advertising directed at children: a site "
        "whose data subjects include minors refuses such a purpose. Whether s.9(3) reaches model "
        "training in a federation is not settled. (interpretation)"
    )

    def evaluate(
        self, run: RunDeclaration, site: SiteManifest, columns: Columns | None = None
    ) -> Decision:
        purpose = get_purpose(run.purpose)
        if not purpose.monitors_people:
            return self.allow(
                f"purpose {purpose.id} is not tracking, monitoring or advertising", site
            )
        if site.has_minors:
            return self.deny(
                f"purpose {purpose.id} is tracking, behavioural monitoring or targeted advertising "
                "and the site's data subjects include minors",
                site,
            )
        return self.allow(
            f"purpose {purpose.id} monitors people but the site declares no minors "
            "(child records are still excluded by DPDP-9-1)",
            site,
        )


class CrossBorderTransfer(SiteRule):
    id = "DPDP-16"
    pack = "dpdp"
    references = ("DPDP Act 2023 s.16(1)", "DPDP Rules 2025 r.15")
    confidence = "V (U: no country notified in sources)"
    description = (
        "Model updates may not go to a country the Central Government has restricted under "
        "s.16(1). The list is the site's restricted_countries, empty by default because none "
        "was found notified (unverified). (interpretation)"
    )

    def evaluate(
        self, run: RunDeclaration, site: SiteManifest, columns: Columns | None = None
    ) -> Decision:
        dest = run.server_country
        name = f"{country_name(dest)} ({dest})"
        if dest in site.restricted_countries:
            return self.deny(
                f"updates to server in {name}, a country restricted under s.16(1)", site
            )
        return self.allow(f"updates to server in {name}: not on the site's s.16(1) list", site)


class LogRetention(SiteRule):
    id = "DPDP-R6-1-e"
    pack = "dpdp"
    references = ("DPDP Rules 2025 r.6(1)(e)", "DPDP Rules 2025 r.8(3)")
    confidence = "V"
    description = (
        "Logs of processing are kept at least one year, at the site and at the server. Where GDPR "
        "also applies and the site's log-retention maximum is shorter, the two laws conflict: "
        "the decision says so (flag 'conflict') and leaves it to a person, rather than "
        "silently picking one number."
    )

    def evaluate(
        self, run: RunDeclaration, site: SiteManifest, columns: Columns | None = None
    ) -> Decision:
        need = LOG_RETENTION_MIN_DAYS
        server_days, site_days = run.log_retention_days, site.log_retention_days
        if server_days < need:
            return self.deny(
                f"the server keeps logs {server_days} days; DPDP requires at least {need}", site
            )
        if site_days >= need:
            return self.allow(f"site keeps logs {site_days} days (at least {need})", site)
        if "gdpr" in site.law_packs:
            return self.allow(
                f"CONFLICT: the site's GDPR log-retention maximum is {site_days} days but DPDP "
                f"requires at least {need}: not resolved automatically, a person must decide",
                site,
                flags=(CONFLICT,),
            )
        return self.deny(
            f"the site keeps logs {site_days} days; DPDP requires at least {need}", site
        )


# ---- record level (in registry order) ----------------------------------------


class ErasureRequest(RecordRule):
    id = "DPDP-12-3"
    pack = "dpdp"
    references = ("DPDP Act 2023 s.12(3)", "DPDP Act 2023 s.8(7)")
    confidence = "V/S"
    description = (
        "A record whose Data Principal asked for erasure is left out of every round from the "
        "request on, and counted."
    )
    excluded_because = "erasure requested"

    def excludes(
        self, record: RecordMeta, run: RunDeclaration, site: SiteManifest, at: datetime
    ) -> bool:
        return record.erasure_due(at)


class ConsentWithdrawal(RecordRule):
    id = "DPDP-6-4"
    pack = "dpdp"
    references = (
        "DPDP Act 2023 s.6(1)",
        "DPDP Act 2023 s.6(4)",
        "DPDP Act 2023 s.6(5)",
        "DPDP Act 2023 s.6(6)",
        "DPDP Act 2023 s.8(7)(a)",
    )
    confidence = "V/S"
    description = (
        "On consent: a record is used only if its Data Principal consented to this purpose and "
        "has not withdrawn (s.6(4)); a withdrawal at or before the round time excludes it from "
        "that round and all later ones (s.6(6)), while processing before it stays lawful "
        "(s.6(5)). On s.7(a) (voluntarily provided): a withdrawal also excludes it."
    )
    applies_when = "the DPDP ground is consent or s.7(a)"
    excluded_because = "no consent for this purpose, or consent withdrawn"

    def applies(self, run: RunDeclaration, site: SiteManifest) -> bool:
        return site.dpdp_ground in ("consent", "7(a)")

    def excludes(
        self, record: RecordMeta, run: RunDeclaration, site: SiteManifest, at: datetime
    ) -> bool:
        if record.withdrawn_by(at):
            return True
        return site.dpdp_ground == "consent" and run.purpose not in record.consented_purposes


class Children(RecordRule):
    id = "DPDP-9-1"
    pack = "dpdp"
    references = (
        "DPDP Act 2023 s.2(f)",
        "DPDP Act 2023 s.9(1)",
        "DPDP Act 2023 s.9(3)",
        "DPDP Rules 2025 r.10",
    )
    confidence = "V (U: the 4th-Schedule health exemption is not applied to research)"
    description = (
        "Records of children (under 18) are left out unless a parent gave verifiable consent, "
        "and always when the purpose is tracking, behavioural monitoring or targeted advertising. "
        "The Fourth-Schedule exemption for clinical establishments covers care of the child, not "
        "model training, so it is not applied. Records of unknown age at a site with minors are "
        "left out by PRIV-AGE-UNKNOWN. (interpretation)"
    )
    excluded_because = "child without verifiable parental consent, or purpose monitors children"

    def excludes(
        self, record: RecordMeta, run: RunDeclaration, site: SiteManifest, at: datetime
    ) -> bool:
        if not record.is_child(CHILD_AGE):
            return False
        return not record.guardian_consent or get_purpose(run.purpose).monitors_people


class PurposeServed(RecordRule):
    id = "DPDP-8-7"
    pack = "dpdp"
    references = ("DPDP Act 2023 s.8(7)(a)", "DPDP Act 2023 s.8(8)")
    confidence = "V (U: the site's retention limit as the end of the purpose)"
    description = (
        "Data are erased once the purpose is no longer served (s.8(7)(a)); s.8(8) deems it no "
        "longer served after a prescribed period. fedmeta takes the site's retention limit "
        "(retention_days) as that point and leaves older records out. (interpretation)"
    )
    excluded_because = "older than the site's retention limit (purpose no longer served)"

    def excludes(
        self, record: RecordMeta, run: RunDeclaration, site: SiteManifest, at: datetime
    ) -> bool:
        return record.older_than(site.retention_days, at)
