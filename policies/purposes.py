"""The purposes a run may declare: a small, fixed taxonomy.

A purpose id is what a run declares (``purpose = "research.model-training"``)
and what a site approves (``approved_purposes = [...]``). Each purpose says in
plain words what it covers and carries the flags the rules read.

The two compatibility columns are fedmeta's reading of the law, not the law's
text (an interpretation):

- ``art9_conditions``: the GDPR Art. 9(2) conditions that can fit the purpose
  ((a) explicit consent always can; (h) is for care; (i) for public health;
  (j) for research under Art. 89(1)).
- ``dpdp_uses``: the DPDP Act 2023 s.7 legitimate uses that can fit the purpose
  (consent under s.6 always can; the s.17(2)(b) research exemption only fits
  research purposes).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Purpose:
    id: str
    description: str
    is_research: bool = False
    is_tracking_or_profiling: bool = False
    is_targeted_advertising: bool = False
    is_information_society_service: bool = False
    """A service offered at a distance, by electronic means, at the request of its user
    (GDPR Art. 4(25)): the only case where GDPR Art. 8 applies to children."""
    art9_conditions: tuple[str, ...] = ("a",)
    dpdp_uses: tuple[str, ...] = ()

    @property
    def monitors_people(self) -> bool:
        """Tracking, behavioural monitoring or targeted advertising (DPDP s.9(3))."""
        return self.is_tracking_or_profiling or self.is_targeted_advertising


PURPOSES: dict[str, Purpose] = {
    p.id: p
    for p in (
        Purpose(
            id="research.model-training",
            description="Scientific research: training a model across institutions; no "
            "decision is taken about any individual patient.",
            is_research=True,
            art9_conditions=("a", "j"),
        ),
        Purpose(
            id="care.diagnosis-support",
            description="Building a tool that helps clinicians diagnose the patients in "
            "their care.",
            art9_conditions=("a", "h"),
            dpdp_uses=("7(a)", "7(f)", "7(g)"),
        ),
        Purpose(
            id="care.treatment",
            description="Providing or planning treatment for the patients in care.",
            art9_conditions=("a", "h"),
            dpdp_uses=("7(a)", "7(f)", "7(g)"),
        ),
        Purpose(
            id="public-health.surveillance",
            description="Monitoring disease in a population to protect public health.",
            art9_conditions=("a", "i"),
            dpdp_uses=("7(c)", "7(g)"),
        ),
        Purpose(
            id="service.online-health-app",
            description="Training the model of an online service (e.g. a health app) that "
            "individuals use directly, on its users' data.",
            is_information_society_service=True,
        ),
        Purpose(
            id="profiling.behavioural",
            description="Building profiles of how individuals behave, to predict or influence it.",
            is_tracking_or_profiling=True,
        ),
        Purpose(
            id="marketing.targeted-advertising",
            description="Choosing which advertisements to show to which individuals.",
            is_tracking_or_profiling=True,
            is_targeted_advertising=True,
        ),
    )
}


def get_purpose(purpose_id: str) -> Purpose:
    """The purpose with this id; KeyError naming the known ids otherwise."""
    try:
        return PURPOSES[purpose_id]
    except KeyError:
        raise KeyError(f"unknown purpose {purpose_id!r}; known: {', '.join(PURPOSES)}") from None
