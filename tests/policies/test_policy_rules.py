"""Every rule in the registry has at least one allowing and one denying/excluding case.

The table below is checked against RULES, so a new rule cannot be added without
adding its two cases here.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from policy_helpers import AT, RESEARCH, decide, make_run, make_site, record

from policies import RULES, Decision, Outcome, check_min_sites

Case = Callable[[], Decision]

CHILD = {"age": 10, "guardian_consent": False}
OLD = {"collected_at": AT - timedelta(days=20 * 365)}
WITHDRAWN = {"consent_withdrawn_at": AT - timedelta(days=1)}

CONSENT_RUN = {"lawful_basis": "a", "special_category_condition": "a"}
CONSENT_SITE = {"lawful_basis": "a", "art9_condition": "a"}
ISS_RUN = {"purpose": "service.online-health-app"}


def _de(**changes) -> object:
    return make_site("site", **changes)


def _in(**changes) -> object:
    return make_site("site-in", **changes)


CASES: dict[str, tuple[Case, Case]] = {
    # ---- GDPR ----------------------------------------------------------------
    "GDPR-44-MODEL": (
        lambda: decide("GDPR-44-MODEL", make_run(), _in(), sites=[_de(), _in()]),
        lambda: decide(
            "GDPR-44-MODEL",
            make_run(),
            _in(transfer_safeguards=()),
            sites=[_de(), _in(transfer_safeguards=())],
        ),
    ),
    "GDPR-26-28": (
        lambda: decide("GDPR-26-28", make_run(), _de(), sites=[_de(), _in()]),
        lambda: decide(
            "GDPR-26-28",
            make_run(),
            _de(site_id="site-unregistered"),
            sites=[_de(site_id="site-unregistered"), _in()],
        ),
    ),
    "GDPR-35": (
        lambda: decide("GDPR-35", make_run(), _de(), sites=[_de(), _in()]),
        lambda: decide(
            "GDPR-35", make_run(), _de(site_id="site-new"), sites=[_de(site_id="site-new"), _in()]
        ),
    ),
    "GDPR-6": (
        lambda: decide("GDPR-6", make_run(), _de()),
        lambda: decide("GDPR-6", make_run(), _de(art6_3_law=None)),
    ),
    "GDPR-9-2": (
        lambda: decide("GDPR-9-2", make_run(), _de()),
        lambda: decide("GDPR-9-2", make_run(), _de(art9_law=None)),
    ),
    "GDPR-5-1-b": (
        lambda: decide("GDPR-5-1-b", make_run(), _de()),
        lambda: decide("GDPR-5-1-b", make_run(purpose="care.treatment"), _de()),
    ),
    "GDPR-5-1-c": (
        lambda: decide("GDPR-5-1-c", make_run(), _de(), read_columns=["bmi", "hba1c"]),
        lambda: decide("GDPR-5-1-c", make_run(), _de(), read_columns=["bmi", "postcode"]),
    ),
    "GDPR-44": (
        lambda: decide("GDPR-44", make_run(), _de()),
        lambda: decide("GDPR-44", make_run(server_country="CN"), _de()),
    ),
    "GDPR-17": (
        lambda: decide("GDPR-17", make_run(), _de(), records=[record()]),
        lambda: decide("GDPR-17", make_run(), _de(), records=[record(erasure_requested=True)]),
    ),
    "GDPR-7-3": (
        lambda: decide("GDPR-7-3", make_run(), _de(**CONSENT_SITE), records=[record()]),
        lambda: decide("GDPR-7-3", make_run(), _de(**CONSENT_SITE), records=[record(**WITHDRAWN)]),
    ),
    "GDPR-21": (
        lambda: decide("GDPR-21", make_run(), _de(), records=[record()]),
        lambda: decide("GDPR-21", make_run(), _de(), records=[record(objected_at=AT)]),
    ),
    "GDPR-18": (
        lambda: decide("GDPR-18", make_run(), _de(), records=[record()]),
        lambda: decide("GDPR-18", make_run(), _de(), records=[record(restricted_at=AT)]),
    ),
    "GDPR-OPT-OUT": (
        lambda: decide("GDPR-OPT-OUT", make_run(), _de(), records=[record()]),
        lambda: decide("GDPR-OPT-OUT", make_run(), _de(), records=[record(opted_out_at=AT)]),
    ),
    "GDPR-8": (
        lambda: decide("GDPR-8", make_run(**ISS_RUN), _de(), records=[record(age=16)]),
        lambda: decide("GDPR-8", make_run(**ISS_RUN), _de(), records=[record(**CHILD)]),
    ),
    "GDPR-MINORS": (
        lambda: decide("GDPR-MINORS", make_run(), _de(), records=[record(age=18)]),
        lambda: decide("GDPR-MINORS", make_run(), _de(), records=[record(age=17)]),
    ),
    "GDPR-5-1-e": (
        lambda: decide("GDPR-5-1-e", make_run(), _de(), records=[record()]),
        lambda: decide("GDPR-5-1-e", make_run(), _de(), records=[record(**OLD)]),
    ),
    # ---- DPDP ----------------------------------------------------------------
    "DPDP-4": (
        lambda: decide("DPDP-4", make_run(), _in()),
        lambda: decide("DPDP-4", make_run(), _in(dpdp_ground=None)),
    ),
    "DPDP-6-1": (
        lambda: decide("DPDP-6-1", make_run(), _in()),
        lambda: decide("DPDP-6-1", make_run(purpose="care.treatment"), _in()),
    ),
    "DPDP-9-3": (
        lambda: decide("DPDP-9-3", make_run(), _in(data_subjects={"patients", "minors"})),
        lambda: decide(
            "DPDP-9-3",
            make_run(purpose="profiling.behavioural"),
            _in(data_subjects={"patients", "minors"}),
        ),
    ),
    "DPDP-16": (
        lambda: decide("DPDP-16", make_run(), _in()),
        lambda: decide("DPDP-16", make_run(), _in(restricted_countries={"DE"})),
    ),
    "DPDP-R6-1-e": (
        lambda: decide("DPDP-R6-1-e", make_run(), _in()),
        lambda: decide("DPDP-R6-1-e", make_run(), _in(log_retention_days=200)),
    ),
    "DPDP-12-3": (
        lambda: decide("DPDP-12-3", make_run(), _in(), records=[record()]),
        lambda: decide("DPDP-12-3", make_run(), _in(), records=[record(erasure_requested=True)]),
    ),
    "DPDP-6-4": (
        lambda: decide("DPDP-6-4", make_run(), _in(), records=[record()]),
        lambda: decide("DPDP-6-4", make_run(), _in(), records=[record(**WITHDRAWN)]),
    ),
    "DPDP-9-1": (
        lambda: decide("DPDP-9-1", make_run(), _in(), records=[record(age=18)]),
        lambda: decide("DPDP-9-1", make_run(), _in(), records=[record(age=17)]),
    ),
    "DPDP-8-7": (
        lambda: decide("DPDP-8-7", make_run(), _in(), records=[record()]),
        lambda: decide("DPDP-8-7", make_run(), _in(), records=[record(**OLD)]),
    ),
    # ---- privacy -------------------------------------------------------------
    "PRIV-DP": (
        lambda: decide("PRIV-DP", make_run(), _de()),
        lambda: decide("PRIV-DP", make_run(epsilon=12.0), _de()),
    ),
    "PRIV-AGE-UNKNOWN": (
        lambda: decide("PRIV-AGE-UNKNOWN", make_run(), _de(), records=[record(minor=False)]),
        lambda: decide("PRIV-AGE-UNKNOWN", make_run(), _de(), records=[record(age=None)]),
    ),
    "PRIV-DATE-UNKNOWN": (
        lambda: decide("PRIV-DATE-UNKNOWN", make_run(), _de(), records=[record()]),
        lambda: decide("PRIV-DATE-UNKNOWN", make_run(), _de(), records=[record(collected_at=None)]),
    ),
    "PRIV-MIN-SITES": (
        lambda: check_min_sites(make_run(), 2),
        lambda: check_min_sites(make_run(), 1),
    ),
}


def test_every_rule_has_cases():
    assert set(CASES) == set(RULES)


@pytest.mark.parametrize("rule_id", sorted(CASES))
def test_allowing_case(rule_id):
    decision = CASES[rule_id][0]()
    assert decision.rule_id == rule_id
    assert decision.outcome is Outcome.ALLOW, decision.reason
    assert not decision.exclusions.get(rule_id)


@pytest.mark.parametrize("rule_id", sorted(CASES))
def test_denying_or_excluding_case(rule_id):
    decision = CASES[rule_id][1]()
    assert decision.rule_id == rule_id
    if decision.level.value == "record":
        assert decision.outcome is Outcome.ALLOW_WITH_EXCLUSIONS, decision.reason
        assert decision.exclusions == {rule_id: 1}
        assert decision.excluded_mask == (True,)
    else:
        assert decision.outcome is Outcome.DENY, decision.reason
    assert decision.references == RULES[rule_id].references


def test_rules_describe_themselves():
    for rule_id, rule in RULES.items():
        assert rule.id == rule_id
        assert rule.pack in {"gdpr", "dpdp", "privacy"}
        assert rule_id.startswith({"gdpr": "GDPR-", "dpdp": "DPDP-", "privacy": "PRIV-"}[rule.pack])
        assert rule.references and rule.description and rule.confidence
        for ref in rule.references:
            assert ref.startswith(("GDPR Art. ", "DPDP Act 2023 s.", "DPDP Rules 2025 r.")), ref
        assert "\n" not in rule.description


def test_interpretations_are_marked():
    """Where the mapping from law to check is ours (confidence U), the description says so."""
    for rule in RULES.values():
        if "U" in rule.confidence.split() or "(U:" in rule.confidence:
            assert "(interpretation" in rule.description, rule.id
    # Art. 8 is now applied only where it applies (information-society services): no
    # interpretation left; research on minors follows the site's declared national law
    assert "(interpretation)" not in RULES["GDPR-8"].description
    assert "information-society" in RULES["GDPR-8"].description
    assert "(interpretation)" in RULES["GDPR-MINORS"].description


def test_research_purpose_in_examples():
    assert make_run().purpose == RESEARCH
