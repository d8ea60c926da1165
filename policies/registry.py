"""Which rules exist, which pack each belongs to, and the order they run in.

The order of ``_RULES`` is the evaluation order. For record-level rules it also
decides where an excluded record is counted: a record that several rules
exclude is counted once, under the first of them in this list (erasure, then
objection, restriction and opt-out, then consent, then children and minors,
then unknown age, then storage limitation and unknown collection date).

To add a rule: write its class in the file of its family (``gdpr.py``,
``dpdp.py``, ``privacy.py``), add one instance here, at the place where it
should run, and add its tests under ``tests/policies/``.
"""

from __future__ import annotations

from collections.abc import Iterable

from policies import dpdp, gates, gdpr, privacy
from policies.rule import Level, Rule

_RULES: tuple[Rule, ...] = (
    # run level: the federation as a whole (server)
    gdpr.ModelTransfer(),
    # gates: the run as it will happen, over the sites still eligible (server, last)
    gates.AgreementsGate(),
    gates.DpiaGate(),
    # round level: the sites sampled for one round (server, check_min_sites)
    privacy.MinSitesPerRound(),
    # site level: may this site take part in this run (server and node)
    gdpr.LawfulBasis(),
    gdpr.SpecialCategories(),
    gdpr.PurposeLimitation(),
    gdpr.DataMinimisation(),
    gdpr.Transfers(),
    dpdp.LawfulGround(),
    dpdp.PurposeLimitation(),
    dpdp.NoTrackingOfChildren(),
    dpdp.CrossBorderTransfer(),
    dpdp.LogRetention(),
    privacy.DifferentialPrivacy(),
    # record level, in the order exclusions are counted (node)
    gdpr.Erasure(),
    dpdp.ErasureRequest(),
    gdpr.Objection(),
    gdpr.Restriction(),
    gdpr.NationalOptOut(),
    gdpr.Consent(),
    dpdp.ConsentWithdrawal(),
    gdpr.Children(),
    gdpr.MinorsNationalLaw(),
    dpdp.Children(),
    privacy.UnknownAge(),
    gdpr.StorageLimitation(),
    dpdp.PurposeServed(),
    privacy.UnknownCollectionDate(),
)

RULES: dict[str, Rule] = {rule.id: rule for rule in _RULES}
"""Every rule by id, in evaluation order."""

PACKS: dict[str, tuple[Rule, ...]] = {
    pack: tuple(rule for rule in _RULES if rule.pack == pack)
    for pack in ("gdpr", "dpdp", "privacy")
}
"""Pack name -> its rules in evaluation order. "privacy" applies to every site."""

ALWAYS_APPLIED: tuple[str, ...] = ("privacy",)


def rules_for(packs: Iterable[str], level: Level) -> list[Rule]:
    """The rules of these packs (plus the always-applied ones) at one level, in order."""
    wanted = set(packs) | set(ALWAYS_APPLIED)
    unknown = wanted - set(PACKS)
    if unknown:
        raise KeyError(f"unknown policy pack(s) {sorted(unknown)}; known: {', '.join(PACKS)}")
    return [rule for rule in _RULES if rule.pack in wanted and rule.level == level]
