"""Run- and site-level rules: the cases a data protection officer asks about."""

from __future__ import annotations

import json
import math

import pytest
from policy_helpers import decide, make_run, make_site

from policies import (
    CONFLICT,
    NON_PRIVATE,
    RULES,
    Decision,
    Outcome,
    check_min_sites,
    eligible_sites,
    evaluate_run,
    evaluate_site,
)
from policies.rule import Level

# ---- GDPR transfers ---------------------------------------------------------


def test_site_in_non_adequate_country_without_scc_is_denied():
    """A GDPR site whose updates would go to a server in a non-adequate country, no SCC."""
    run = make_run(server_country="CN")  # China: no adequacy decision
    decisions = evaluate_run(run, [make_site()])
    (d,) = [d for d in decisions if d.rule_id == "GDPR-44"]
    assert d.denied and "China (CN)" in d.reason and "no SCC reference" in d.reason
    assert d.references == ("GDPR Art. 44", "GDPR Art. 45", "GDPR Art. 46(2)(c)")
    assert eligible_sites(decisions, [make_site()]) == []


def test_model_sent_to_non_adequate_site_without_scc_is_denied():
    run = make_run()
    in_no_scc = make_site("site-in", transfer_safeguards=())
    decisions = evaluate_run(run, [make_site(), in_no_scc])
    model = {d.site_id: d for d in decisions if d.rule_id == "GDPR-44-MODEL"}
    assert model["site-de-01"].allowed
    assert model["site-in-01"].denied and "India (IN)" in model["site-in-01"].reason
    assert eligible_sites(decisions, [make_site(), in_no_scc]) == [make_site()]
    # a federation without any GDPR site has nothing to check here
    assert "GDPR-44-MODEL" not in {d.rule_id for d in evaluate_run(run, [in_no_scc])}
    (only,) = RULES["GDPR-44-MODEL"].evaluate(run, [in_no_scc])
    assert only.allowed and only.site_id is None


@pytest.mark.parametrize(
    ("server", "site_safeguards", "scc", "allowed"),
    [
        ("DE", (), None, True),  # EEA
        ("NO", (), None, True),  # EEA, not EU
        ("CH", (), None, True),  # full adequacy
        ("GB", (), None, True),
        ("US", (), None, False),  # adequacy only for DPF-certified companies
        ("US", ("adequacy",), None, True),  # site confirms the recipient is certified
        ("BR", (), None, True),  # Implementing Decision (EU) 2026/179
        ("JP", (), None, False),  # private sector only: a public hospital is outside it
        ("JP", ("adequacy",), None, True),
        ("CN", ("adequacy",), None, False),  # claiming adequacy where there is none
        ("CN", ("SCC-2021/914-C2P",), None, True),  # the site's SCC
        ("CN", (), "SCC-2021/914-C2C", True),  # the run's SCC
        ("IN", (), None, False),
        ("RE", (), None, True),  # Réunion: an outermost region, EU territory
        ("AX", (), None, True),  # Åland: EU territory
    ],
)
def test_transfer_grounds(server, site_safeguards, scc, allowed):
    run = make_run(server_country=server, scc_reference=scc)
    site = make_site(transfer_safeguards=site_safeguards)
    assert decide("GDPR-44", run, site).allowed is allowed


# ---- GDPR basis, Art. 9, purpose, minimisation ------------------------------


def test_lawful_basis_cases():
    # each controller relies on its own basis: the site's wins over the run's
    d = decide("GDPR-6", make_run(lawful_basis="a"), make_site(lawful_basis="e"))
    assert d.allowed and "(e) public task (the site's basis)" in d.reason
    assert decide("GDPR-6", make_run(lawful_basis="e"), make_site(lawful_basis=None)).allowed
    f_run = make_run(lawful_basis="f")
    d = decide("GDPR-6", f_run, make_site(lawful_basis=None))
    assert d.denied and "balancing test" in d.reason
    f_ok = make_run(lawful_basis="f", legitimate_interests_assessment="LIA-2025-04")
    assert decide("GDPR-6", f_ok, make_site(lawful_basis="f")).allowed
    # (c) and (e) need the Art. 6(3) law, and it must be the law of the site's country
    d = decide("GDPR-6", make_run(), make_site(art6_3_law=None))
    assert d.denied and "Art. 6(3)" in d.reason and "art6_3_law" in d.reason
    d = decide("GDPR-6", make_run(), make_site(art6_3_law="FR: Code de la santé publique"))
    assert d.denied and "FR law but the site is in DE" in d.reason
    assert decide("GDPR-6", make_run(), make_site(art6_3_law="EU: Regulation X")).allowed
    assert decide("GDPR-6", make_run(), make_site(lawful_basis="a", art6_3_law=None)).allowed
    neither = decide("GDPR-6", make_run(lawful_basis=None), make_site(lawful_basis=None))
    assert neither.denied


def test_special_category_cases():
    no_law = make_site(art9_law=None)
    d = decide("GDPR-9-2", make_run(), no_law)
    assert d.denied and "art9_law" in d.reason
    foreign = make_site(art9_law="IN: some Indian statute")
    d = decide("GDPR-9-2", make_run(), foreign)
    assert d.denied and "IN law but the site is in DE" in d.reason
    # the law is printed where it is required ((g)-(j)), not for explicit consent
    d = decide("GDPR-9-2", make_run(), make_site())
    assert d.allowed and "law: DE: " in d.reason
    d = decide("GDPR-9-2", make_run(), make_site(art9_condition="a"))
    assert d.allowed and "law" not in d.reason
    # the site's own condition wins; else the run's
    care_for_research = make_site(art9_condition="h")
    d = decide("GDPR-9-2", make_run(), care_for_research)
    assert d.denied and "does not fit purpose research.model-training" in d.reason
    inherits = make_site(art9_condition=None)
    assert decide("GDPR-9-2", make_run(special_category_condition="a"), inherits).allowed
    # (h) needs the Art. 9(3) secrecy obligation
    care = make_run(purpose="care.treatment")
    care_site = make_site(approved_purposes={"care.treatment"}, art9_condition="h")
    d = decide("GDPR-9-2", care, care_site)
    assert d.denied and "Art. 9(3)" in d.reason
    secrecy = "medical staff under professional secrecy (example)"
    ok = care_site.model_copy(update={"art9_3_secrecy": secrecy})
    assert decide("GDPR-9-2", care, ok).allowed
    no_special = make_site(data_categories={"demographic"})
    assert decide("GDPR-9-2", make_run(special_category_condition=None), no_special).allowed
    genetic = make_site(data_categories={"genetic"}, art9_condition=None)
    assert decide("GDPR-9-2", make_run(special_category_condition=None), genetic).denied


def test_run_level_special_category_law_moved_to_sites():
    with pytest.raises(ValueError, match="art9_law"):
        make_run(special_category_law="DE: anything")


def test_national_law_fields_name_their_jurisdiction():
    with pytest.raises(ValueError, match="'DE: <citation>'"):
        make_site(art9_law="some law without a country")
    with pytest.raises(ValueError, match="ISO 3166"):
        make_site(art9_law="XX: a law of nowhere")
    assert make_site(art9_law="de:  Gesetz   X").art9_law == "DE: Gesetz X"


def test_minimisation_is_checked_only_where_columns_are_known(run, de_site):
    server_view = [d.rule_id for d in evaluate_site(run, de_site)]
    assert "GDPR-5-1-c" not in server_view
    ok = evaluate_site(run, de_site, read_columns=["bmi", "ldl"])
    assert [d for d in ok if d.rule_id == "GDPR-5-1-c"][0].allowed
    extra = evaluate_site(run, de_site, read_columns=["bmi", "postcode", "name"])
    (d,) = [d for d in extra if d.rule_id == "GDPR-5-1-c"]
    assert d.denied and d.reason == "reads undeclared columns: name, postcode"
    # declared_columns given by the caller take the manifest's place
    d2 = evaluate_site(run, de_site, read_columns=["postcode"], declared_columns=["postcode"])
    assert [d for d in d2 if d.rule_id == "GDPR-5-1-c"][0].allowed
    undeclared = make_site(feature_columns=())
    d3 = evaluate_site(run, undeclared, read_columns=["bmi"])
    assert [d for d in d3 if d.rule_id == "GDPR-5-1-c"][0].denied
    with pytest.raises(TypeError):
        evaluate_site(run, de_site, read_columns="bmi")


# ---- DPDP ---------------------------------------------------------------------


def test_dpdp_site_refuses_behavioural_profiling_with_minors():
    run = make_run(purpose="profiling.behavioural", special_category_condition="a")
    site = make_site(
        "site-in",
        data_subjects={"patients", "minors"},
        approved_purposes={"profiling.behavioural"},
    )
    decisions = evaluate_site(run, site)
    (d,) = [d for d in decisions if d.rule_id == "DPDP-9-3"]
    assert d.denied and d.references == ("DPDP Act 2023 s.9(3)",)
    assert "minors" in d.reason
    # the same purpose without minors among the data subjects is not refused by s.9(3)
    adults = make_site("site-in", approved_purposes={"profiling.behavioural"})
    assert [d for d in evaluate_site(run, adults) if d.rule_id == "DPDP-9-3"][0].allowed
    # targeted advertising is refused the same way
    ads = make_run(purpose="marketing.targeted-advertising")
    assert decide("DPDP-9-3", ads, site).denied


def test_log_retention_conflict_is_reported_not_resolved():
    site = make_site(law_packs=("gdpr", "dpdp"), dpdp_ground="consent", log_retention_days=180)
    decisions = evaluate_site(make_run(), site)
    (d,) = [d for d in decisions if d.rule_id == "DPDP-R6-1-e"]
    assert d.outcome is Outcome.ALLOW and d.conflict and d.flags == (CONFLICT,)
    assert "CONFLICT" in d.reason and "180" in d.reason and "365" in d.reason
    assert d.to_dict()["flags"] == ["conflict"]
    # DPDP alone: too short is simply denied
    dpdp_only = make_site("site-in", log_retention_days=180)
    d2 = decide("DPDP-R6-1-e", make_run(), dpdp_only)
    assert d2.denied and not d2.conflict
    # the server's own logs must be kept a year too
    assert decide("DPDP-R6-1-e", make_run(log_retention_days=90), make_site("site-in")).denied
    # no conflict when the GDPR maximum is a year or more
    long = make_site(law_packs=("gdpr", "dpdp"), dpdp_ground="consent", log_retention_days=400)
    assert not decide("DPDP-R6-1-e", make_run(), long).conflict


def test_dpdp_grounds():
    run = make_run()
    li = make_site("site-in", dpdp_ground=None, lawful_basis="f")
    d = decide("DPDP-4", run, li)
    assert d.denied and "legitimate interests has no DPDP equivalent" in d.reason
    assert decide("DPDP-4", run, make_site("site-in", dpdp_ground="17(2)(b)")).allowed
    assert decide("DPDP-4", run, make_site("site-in", dpdp_ground="7(g)")).denied
    care = make_run(purpose="care.treatment")
    assert decide("DPDP-4", care, make_site("site-in", dpdp_ground="7(g)")).allowed
    assert decide("DPDP-4", care, make_site("site-in", dpdp_ground="17(2)(b)")).denied


def test_dpdp_restricted_country():
    site = make_site("site-in", restricted_countries={"DE", "CN"})
    d = decide("DPDP-16", make_run(), site)
    assert d.denied and "Germany (DE)" in d.reason
    assert make_site("site-in").restricted_countries == frozenset()


# ---- privacy ------------------------------------------------------------------


def test_differential_privacy_cases():
    site = make_site()  # epsilon_max 10, delta 1e-5
    assert decide("PRIV-DP", make_run(epsilon=10.0), site).allowed
    assert decide("PRIV-DP", make_run(delta=1e-4), site).denied
    off = make_run(dp_enabled=False, epsilon=None, delta=None)
    d = decide("PRIV-DP", off, site)
    assert d.denied and "allow_non_private" in d.reason
    reported = make_run(dp_enabled=False, epsilon=None, delta=None, allow_non_private=True)
    d = decide("PRIV-DP", reported, site)
    assert d.denied and d.flags == (NON_PRIVATE,)
    accepting = make_site(epsilon_max=math.inf)
    d = decide("PRIV-DP", reported, accepting)
    assert d.allowed and NON_PRIVATE in d.flags and "NON-PRIVATE" in d.reason


def test_min_sites_per_round():
    run = make_run(min_sites_per_round=3)
    ok, short = check_min_sites(run, 3), check_min_sites(run, 2)
    assert ok.allowed and short.denied and "not run" in short.reason
    assert short.level is Level.ROUND and short.rule_id == "PRIV-MIN-SITES"
    (same,) = RULES["PRIV-MIN-SITES"].evaluate(run, [make_site(), make_site("site-in")])
    assert same == short
    # not part of evaluate_run: that is checked per round with the sampled sites
    assert "PRIV-MIN-SITES" not in {d.rule_id for d in evaluate_run(run, [make_site()])}


# ---- evaluate_run / evaluate_site -----------------------------------------------


def test_packs_applied_are_the_sites_law_packs(run, de_site, in_site):
    de_ids = {d.rule_id for d in evaluate_site(run, de_site)}
    in_ids = {d.rule_id for d in evaluate_site(run, in_site)}
    assert de_ids == {"GDPR-6", "GDPR-9-2", "GDPR-5-1-b", "GDPR-44", "PRIV-DP"}
    assert in_ids == {"DPDP-4", "DPDP-6-1", "DPDP-9-3", "DPDP-16", "DPDP-R6-1-e", "PRIV-DP"}
    both = make_site(law_packs=("gdpr", "dpdp"), dpdp_ground="consent")
    assert {d.rule_id for d in evaluate_site(run, both)} == de_ids | in_ids


def test_evaluate_run_orders_and_labels(run, de_site, in_site):
    decisions = evaluate_run(run, [de_site, in_site])
    *rules, parties, dpia = decisions  # the gates come last, over the sites still eligible
    levels = [d.level for d in rules]
    assert levels == sorted(levels, key=[Level.RUN, Level.SITE].index)
    assert [parties.rule_id, dpia.rule_id] == ["GDPR-26-28", "GDPR-35"]
    assert parties.allowed and dpia.allowed and dpia.level is Level.RUN
    assert {d.site_id for d in decisions if d.level is Level.SITE} == {"site-de-01", "site-in-01"}
    with pytest.raises(ValueError, match="unique"):
        evaluate_run(run, [de_site, de_site])


def test_a_run_level_deny_blocks_every_site(de_site):
    deny = Decision("X", Outcome.DENY, (), "no", Level.RUN)
    assert eligible_sites([deny], [de_site]) == []


def test_purpose_limitation_both_packs():
    run = make_run(purpose="public-health.surveillance", special_category_condition="i")
    for name, rule_id in (("site", "GDPR-5-1-b"), ("site-in", "DPDP-6-1")):
        d = decide(rule_id, run, make_site(name))
        assert d.denied and "public-health.surveillance" in d.reason


# ---- decisions --------------------------------------------------------------------


def test_decision_serialisation_is_canonical_and_local_mask_stays_local():
    d = Decision(
        rule_id="GDPR-17",
        outcome=Outcome.ALLOW_WITH_EXCLUSIONS,
        references=("GDPR Art. 17(1)",),
        reason="1 of 2 record(s) excluded",
        level=Level.RECORD,
        site_id="site-de-01",
        exclusions={"GDPR-17": 1},
        excluded_mask=(True, False),
    )
    data = d.to_dict()
    assert list(data) == [
        "rule_id",
        "outcome",
        "level",
        "site_id",
        "references",
        "reason",
        "exclusions",
        "flags",
    ]
    assert data["outcome"] == "allow-with-exclusions" and data["exclusions"] == {"GDPR-17": 1}
    assert json.loads(json.dumps(data)) == data
    back = Decision.from_dict(data)
    assert back == d and back.excluded_mask is None
    with pytest.raises(ValueError, match="one line"):
        Decision("X", Outcome.ALLOW, (), "two\nlines", Level.SITE)
    with pytest.raises(ValueError):
        Decision("X", "maybe", (), "r", Level.SITE)  # type: ignore[arg-type]


def test_every_decision_reason_is_one_line(run, de_site, in_site):
    for d in evaluate_run(run, [de_site, in_site, make_site("site", site_id="b", country="BR")]):
        assert "\n" not in d.reason and d.reason
        assert d.references == RULES[d.rule_id].references
