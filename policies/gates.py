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
from policies.rule import Decision, GateRule


class DpiaGate(GateRule):
    id = "GDPR-35"
    pack = "gdpr"
    references = ("GDPR Art. 35(1)", "GDPR Art. 35(3)(b)", "GDPR Art. 35(11)",
                  "GDPR Art. 36(1)")
    checklist = ("G15",)
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

    def gate(self, run: RunDeclaration, sites: Sequence[SiteManifest], transport: str | None,
             today: date) -> list[Decision]:
        special = sorted({s.site_id for s in sites if s.special_categories})
        dpia = run.dpia
        if dpia is None:
            if special:
                return [self.deny(
                    f"no DPIA: {len(special)} site(s) process special-category data "
                    f"({', '.join(special[:5])}{', ...' if len(special) > 5 else ''}); name "
                    "an approved DPIA with dpia_file in the run declaration")]
            return [self.allow("no site processes special-category data and no DPIA is "
                               "attached (assess the WP248 criteria in the report)")]
        problems = approval_problems(dpia)
        if problems:
            return [self.deny(f"{dpia.label()} is not approved: {'; '.join(problems)}")]
        epsilon = run.epsilon if run.dp_enabled else None
        stale = stale_reasons(dpia, epsilon, run.purpose,
                              [(s.site_id, s.country) for s in sites], transport, today)
        if stale:
            return [self.deny(f"{dpia.label()} is stale: {'; '.join(stale)}; re-assess and "
                              "approve a new version before the run")]
        conditions = (f"; conditions: {'; '.join(dpia.conditions)}"
                      if dpia.conditions else "")
        return [self.allow(f"{dpia.label()} approved ({dpia.decision}), current until "
                           f"{dpia.review_date.isoformat()}, covers the {len(sites)} site(s) "
                           f"of this run{conditions}")]
