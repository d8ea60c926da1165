"""Privacy rules that apply to every site, whatever its law packs.

These are fedmeta's own safeguards (data protection by design, security of
processing, accountability); the law requires the outcome, not these particular
mechanisms (confidence U: design).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime

from policies.declarations import RunDeclaration, SiteManifest
from policies.records import RecordMeta
from policies.rule import NON_PRIVATE, Columns, Decision, RecordRule, RoundRule, SiteRule


class DifferentialPrivacy(SiteRule):
    id = "PRIV-DP"
    pack = "privacy"
    references = ("GDPR Art. 25(1)", "GDPR Art. 32(1)", "DPDP Rules 2025 r.6(1)(a)")
    confidence = "U (design)"
    description = (
        "Every run trains with differential privacy, and the guarantee it offers each site "
        "(epsilon, delta) must be within the site's limits (epsilon_max, delta). A run may go "
        "without DP only if it says so (allow_non_private, then reported) and the site accepts "
        "any epsilon (epsilon_max = inf). (interpretation: fedmeta's design)"
    )

    def evaluate(
        self, run: RunDeclaration, site: SiteManifest, columns: Columns | None = None
    ) -> Decision:
        if not run.dp_enabled:
            if not run.allow_non_private:
                return self.deny(
                    "differential privacy is disabled and allow_non_private is not set", site
                )
            if math.isfinite(site.epsilon_max):
                return self.deny(
                    "the run offers no DP guarantee; the site requires epsilon <= "
                    f"{site.epsilon_max:g}",
                    site,
                    flags=(NON_PRIVATE,),
                )
            return self.allow(
                "NON-PRIVATE run (allow_non_private) and the site accepts any epsilon",
                site,
                flags=(NON_PRIVATE,),
            )
        assert run.epsilon is not None and run.delta is not None  # checked when loaded
        if run.epsilon > site.epsilon_max:
            return self.deny(
                f"the run offers epsilon {run.epsilon:g}; the site accepts at most "
                f"{site.epsilon_max:g}",
                site,
            )
        if run.delta > site.delta:
            return self.deny(
                f"the run offers delta {run.delta:g}; the site accepts at most {site.delta:g}", site
            )
        return self.allow(
            f"epsilon {run.epsilon:g} <= {site.epsilon_max:g} and delta {run.delta:g} <= "
            f"{site.delta:g}",
            site,
        )


class MinSitesPerRound(RoundRule):
    id = "PRIV-MIN-SITES"
    pack = "privacy"
    references = ("GDPR Art. 32(1)",)
    confidence = "V (feature) / U (design)"
    description = (
        "A round with fewer sites than the run's min_sites_per_round is not run, so that no "
        "update is aggregated from too few institutions. (interpretation: fedmeta's design)"
    )

    def evaluate(self, run: RunDeclaration, sites: Sequence[SiteManifest]) -> list[Decision]:
        return [check_min_sites(run, len(sites))]


def check_min_sites(declaration: RunDeclaration, n_sites: int) -> Decision:
    """Allow a round with ``n_sites`` sites only if the run's minimum is met."""
    rule = MinSitesPerRound()
    need = declaration.min_sites_per_round
    if n_sites >= need:
        return rule.allow(f"{n_sites} site(s) in the round, at least {need} required")
    return rule.deny(
        f"{n_sites} site(s) in the round, at least {need} required: the round is not run"
    )


class UnknownAge(RecordRule):
    id = "PRIV-AGE-UNKNOWN"
    pack = "privacy"
    references = ("GDPR Art. 5(2)", "GDPR Art. 89(1)", "DPDP Act 2023 s.9(1)")
    confidence = "U (design: fail closed)"
    description = (
        "At a site whose data subjects include minors, a record with neither an age nor a minor "
        "flag cannot be checked against the minors rules, so it is left out and counted as of "
        "unknown age, never treated as an adult. (interpretation)"
    )
    applies_when = "the site's data subjects include minors"
    excluded_because = "age unknown at a site with minors"

    def applies(self, run: RunDeclaration, site: SiteManifest) -> bool:
        return site.has_minors

    def excludes(
        self, record: RecordMeta, run: RunDeclaration, site: SiteManifest, at: datetime
    ) -> bool:
        return record.age is None and record.minor is None


class UnknownCollectionDate(RecordRule):
    id = "PRIV-DATE-UNKNOWN"
    pack = "privacy"
    references = ("GDPR Art. 5(1)(e)", "GDPR Art. 5(2)", "DPDP Act 2023 s.8(7)(a)")
    confidence = "U (design: fail closed)"
    description = (
        "At a site that records collection dates (collection_dates_recorded), a record without "
        "one cannot be checked against the retention limit, so it is left out and counted. A "
        "site that does not record them says so in its manifest, and the decision shows it. "
        "(interpretation)"
    )
    applies_when = "the site records collection dates"
    excluded_because = "collection date unknown, so retention cannot be checked"

    def applies(self, run: RunDeclaration, site: SiteManifest) -> bool:
        return site.collection_dates_recorded

    def excludes(
        self, record: RecordMeta, run: RunDeclaration, site: SiteManifest, at: datetime
    ) -> bool:
        return record.collected_at is None
