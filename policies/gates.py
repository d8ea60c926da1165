"""Gates: rules that decide whether the run as a whole may start, over the sites that
will really take part (after every other rule), e.g. the DPIA gate (GDPR-35).

A gate's denial has no site: :func:`policies.engine.eligible_sites` then returns
none, so the server starts nothing and audits the refusal in one line that names
what is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date

from policies.declarations import RunDeclaration, SiteManifest
from policies.dpia import approval_problems, stale_reasons
from policies.gdpr import transfer_ground
from policies.parties import registry_problems
from policies.rule import Decision, GateRule


class DpiaGate(GateRule):
    id = "GDPR-35"
    pack = "gdpr"
    references = ("GDPR Art. 35(1)", "GDPR Art. 35(3)(b)", "GDPR Art. 35(11)", "GDPR Art. 36(1)")
    confidence = "V (U: that health data at several hospitals is always DPIA-mandatory)"
    description = (
        "A run in which any site processes special categories of data (Art. 9(1)) needs a "
        "DPIA before processing (Art. 35(1), 35(3)(b)): the declaration must carry one "
        "(dpia_file) that is approved, with the DPO's advice recorded (Art. 35(2)), before "
        "its review date, and whose scope covers every site, country and purpose of the "
        "run, its epsilon and its transport. A change outside the scope makes it stale "
        "(Art. 35(11)) and the run is refused until a new version is approved; a DPIA "
        "referred under Art. 36 or rejected stops the run. (interpretation: which changes "
        "make a DPIA stale)"
    )

    def gate(
        self, run: RunDeclaration, sites: Sequence[SiteManifest], transport: str | None, today: date
    ) -> list[Decision]:
        special = sorted({s.site_id for s in sites if s.special_categories})
        dpia = run.dpia
        if dpia is None:
            if special:
                return [
                    self.deny(
                        f"no DPIA: {len(special)} site(s) process special-category data "
                        f"({', '.join(special[:5])}{', ...' if len(special) > 5 else ''}); name "
                        "an approved DPIA with dpia_file in the run declaration"
                    )
                ]
            return [
                self.allow(
                    "no site processes special-category data and no DPIA is "
                    "attached (assess the WP248 criteria in the report)"
                )
            ]
        problems = approval_problems(dpia)
        if problems:
            return [self.deny(f"{dpia.label()} is not approved: {'; '.join(problems)}")]
        epsilon = run.epsilon if run.dp_enabled else None
        stale = stale_reasons(
            dpia, epsilon, run.purpose, [(s.site_id, s.country) for s in sites], transport, today
        )
        if stale:
            return [
                self.deny(
                    f"{dpia.label()} is stale: {'; '.join(stale)}; re-assess and "
                    "approve a new version before the run"
                )
            ]
        conditions = f"; conditions: {'; '.join(dpia.conditions)}" if dpia.conditions else ""
        return [
            self.allow(
                f"{dpia.label()} approved ({dpia.decision}), current until "
                f"{dpia.review_date.isoformat()}, covers the {len(sites)} site(s) "
                f"of this run{conditions}"
            )
        ]


def _third_country(code: str) -> bool:
    """Sending the model there needs SCCs: outside the EEA, no (full) adequacy decision."""
    ground, _ = transfer_ground(code, ())
    return ground is None


class AgreementsGate(GateRule):
    id = "GDPR-26-28"
    pack = "gdpr"
    references = ("GDPR Art. 26(1)", "GDPR Art. 28(3)", "GDPR Art. 30(1)", "GDPR Art. 46(2)(c)")
    confidence = "V (U: the coordinator as the exporter of the model, the SCC module by role)"
    description = (
        "The run declaration must carry a party registry ([registry]) naming the legal "
        "entity and role of the coordinator and of every party that runs a site, with the "
        "documents their roles need, unexpired: an Art. 26 arrangement binding all "
        "controllers when there are two or more, an Art. 28(3) contract (and the DPDP s.8(2) "
        "contract for a DPDP site) between each processor and a controller, and SCCs between "
        "the coordinator and each party in a third country without adequacy, of the module "
        "that fits their roles (C2C, C2P, P2P, P2C). Otherwise the run is refused in one "
        "line naming the party and the document. (interpretation: the coordinator is the "
        "exporter of the model to every party)"
    )

    def gate(
        self, run: RunDeclaration, sites: Sequence[SiteManifest], transport: str | None, today: date
    ) -> list[Decision]:
        if run.registry is None:
            return [
                self.deny(
                    "no party registry in the run declaration: add [registry] with "
                    "every party, its role and its signed agreements"
                )
            ]
        problems = registry_problems(
            run.registry,
            [(s.site_id, s.legal_entity_id, " ".join(s.law_packs)) for s in sites],
            _third_country,
            today,
        )
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            return [self.deny(f"{problems[0]}{more}")]
        return [
            self.allow(
                f"every party of the {len(sites)} site(s) is registered with the "
                "documents its role needs, none expired"
            )
        ]
