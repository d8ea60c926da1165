"""Record-level evaluation: constructed counts, attribution order, withdrawal over rounds."""

from __future__ import annotations

import json
import time
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_helpers import AT, RESEARCH, make_run, make_site, record

from policies import (
    RULES,
    Outcome,
    RecordMeta,
    evaluate_records,
    records_from_columns,
    suppress_small_counts,
)
from policies.rule import Level

CONSENT_RUN = {"lawful_basis": "a", "special_category_condition": "a"}
CONSENT_SITE = {"lawful_basis": "a", "art9_condition": "a"}
"""A site that relies on (explicit) consent itself: its own basis wins over the run's."""


def constructed(n_withdrawn, n_erasure, n_minors, n_old, n_good):
    """Records with exactly these problems, one problem each, plus traps that must stay in."""
    recs = []
    recs += [record(consent_withdrawn_at=AT - timedelta(days=3)) for _ in range(n_withdrawn)]
    recs += [record(erasure_requested=True) for _ in range(n_erasure)]
    recs += [record(age=12, guardian_consent=False) for _ in range(n_minors)]
    recs += [record(collected_at=AT - timedelta(days=4000)) for _ in range(n_old)]
    recs += [record() for _ in range(n_good)]
    traps = [
        record(consent_withdrawn_at=AT + timedelta(days=1)),  # withdraws after this round
        record(erasure_requested=AT + timedelta(hours=1)),  # asks after this round
        record(age=12, guardian_consent=True),  # child with guardian consent
        record(collected_at=AT - timedelta(days=3649)),  # just inside retention
    ]
    # unknown age, or unknown date, at a site with minors that records dates: left out and
    # counted, never silently kept as an adult or as recent
    unknown = [record(age=None), record(collected_at=None)]
    return recs + traps + unknown, n_good + len(traps)


@pytest.mark.parametrize(("n", "m", "k", "r"), [(7, 3, 4, 5), (0, 1, 0, 2), (11, 0, 6, 0)])
def test_constructed_numbers_gdpr(n, m, k, r):
    run = make_run(**CONSENT_RUN)
    site = make_site(**CONSENT_SITE)  # DE, gdpr, retention 3650 days, child age 16
    recs, n_ok = constructed(n, m, k, r, n_good=9)
    verdict = evaluate_records(run, site, recs, AT)
    assert verdict.excluded_by_rule == {
        "GDPR-17": m,
        "GDPR-21": 0,
        "GDPR-18": 0,
        "GDPR-OPT-OUT": 0,
        "GDPR-7-3": n,
        "GDPR-MINORS": k,
        "PRIV-AGE-UNKNOWN": 1,
        "GDPR-5-1-e": r,
        "PRIV-DATE-UNKNOWN": 1,
    }
    assert verdict.n_allowed == n_ok
    assert verdict.n_excluded == n + m + k + r + 2
    assert len(verdict.allowed_mask) == len(recs)
    for d in verdict.decisions:
        expected = verdict.excluded_by_rule.get(d.rule_id, 0)  # GDPR-8: not applicable
        assert d.exclusions == ({d.rule_id: expected} if expected else {})
        assert d.outcome is (Outcome.ALLOW_WITH_EXCLUSIONS if expected else Outcome.ALLOW)


def test_constructed_numbers_dpdp():
    run = make_run()
    site = make_site("site-in")  # IN, dpdp on consent, retention 1825 days
    recs = (
        [record(consent_withdrawn_at=AT - timedelta(days=1)) for _ in range(4)]
        + [record(erasure_requested=AT - timedelta(days=1)) for _ in range(2)]
        + [record(age=17) for _ in range(3)]
        + [record(collected_at=AT - timedelta(days=1900)) for _ in range(6)]
        + [record(consented_purposes=set()) for _ in range(1)]  # never consented to research
        + [record() for _ in range(5)]
    )
    verdict = evaluate_records(run, site, recs, AT)
    assert verdict.excluded_by_rule == {
        "DPDP-12-3": 2,
        "DPDP-6-4": 5,
        "DPDP-9-1": 3,
        "DPDP-8-7": 6,
        "PRIV-DATE-UNKNOWN": 0,
    }
    assert verdict.n_allowed == 5


def test_each_record_counted_once_under_the_first_rule():
    run = make_run(**CONSENT_RUN)
    both = record(
        erasure_requested=True,
        consent_withdrawn_at=AT - timedelta(days=1),
        age=10,
        collected_at=AT - timedelta(days=5000),
    )
    verdict = evaluate_records(run, make_site(**CONSENT_SITE), [both, record()], AT)
    assert verdict.excluded_by_rule == {
        "GDPR-17": 1,
        "GDPR-21": 0,
        "GDPR-18": 0,
        "GDPR-OPT-OUT": 0,
        "GDPR-7-3": 0,
        "GDPR-MINORS": 0,
        "PRIV-AGE-UNKNOWN": 0,
        "GDPR-5-1-e": 0,
        "PRIV-DATE-UNKNOWN": 0,
    }
    assert verdict.allowed_mask == (False, True)
    by_id = {d.rule_id: d for d in verdict.decisions}
    # every rule still knows, locally, which records it excludes
    assert by_id["GDPR-MINORS"].excluded_mask == (True, False)
    assert by_id["GDPR-MINORS"].outcome is Outcome.ALLOW_WITH_EXCLUSIONS
    assert "0 of 2 record(s) excluded" in by_id["GDPR-MINORS"].reason
    assert "1 more already excluded by an earlier rule" in by_id["GDPR-MINORS"].reason


def test_both_packs_use_registry_order():
    run = make_run(**CONSENT_RUN)
    site = make_site(law_packs=("gdpr", "dpdp"), dpdp_ground="consent", **CONSENT_SITE)
    verdict = evaluate_records(run, site, [record(age=17), record(erasure_requested=True)], AT)
    record_rules = [r.id for r in RULES.values() if r.level is Level.RECORD]
    # GDPR-8 applies to information-society services only, not to this research run
    assert list(verdict.excluded_by_rule) == [r for r in record_rules if r != "GDPR-8"]
    assert verdict.excluded_by_rule["GDPR-17"] == 1
    assert verdict.excluded_by_rule["DPDP-12-3"] == 0
    # 17 is a minor under the site's national law (18): counted under the first rule
    assert verdict.excluded_by_rule["GDPR-MINORS"] == 1
    assert verdict.excluded_by_rule["DPDP-9-1"] == 0


def test_withdrawal_excludes_from_that_round_and_all_later():
    run = make_run(**CONSENT_RUN)
    site = make_site(**CONSENT_SITE)
    withdrawn_at = AT
    rec = record(consent_withdrawn_at=withdrawn_at)
    rounds = [AT - timedelta(days=2), AT - timedelta(seconds=1), AT, AT + timedelta(days=30)]
    used = [evaluate_records(run, site, [rec], t).allowed_mask[0] for t in rounds]
    assert used == [True, True, False, False]


def test_consent_rule_only_when_consent_is_the_basis():
    site = make_site()
    no_consent = record(consented_purposes=set())
    verdict = evaluate_records(make_run(), site, [no_consent], AT)  # basis (e), 9(2)(j)
    assert verdict.allowed_mask == (True,)
    assert "GDPR-7-3" not in verdict.excluded_by_rule
    (d,) = [d for d in verdict.decisions if d.rule_id == "GDPR-7-3"]
    assert d.outcome is Outcome.ALLOW and d.reason.startswith("not applicable")
    # consent only for another purpose is no consent for this one
    other = record(consented_purposes={"care.treatment"})
    verdict = evaluate_records(make_run(**CONSENT_RUN), make_site(**CONSENT_SITE), [other], AT)
    assert verdict.excluded_by_rule["GDPR-7-3"] == 1
    # explicit consent under Art. 9(2)(a) alone also triggers the rule
    verdict = evaluate_records(make_run(), make_site(art9_condition="a"), [other], AT)
    assert verdict.excluded_by_rule["GDPR-7-3"] == 1
    # a site without its own basis relies on the run's
    inherits = make_site(lawful_basis=None, art9_condition=None)
    verdict = evaluate_records(make_run(**CONSENT_RUN), inherits, [other], AT)
    assert verdict.excluded_by_rule["GDPR-7-3"] == 1


def test_children_thresholds():
    # GDPR Art. 8 covers information-society services offered to children, nothing else
    iss = make_run(purpose="service.online-health-app")
    national = {"minors_need_guardian_consent": False}  # isolate GDPR-8 from GDPR-MINORS
    site13 = make_site(gdpr_child_age=13, **national)
    site16 = make_site(**national)
    fourteen = record(age=14)
    flagged = record(age=None, minor=True)
    assert evaluate_records(iss, site13, [fourteen], AT).allowed_mask == (True,)
    assert evaluate_records(iss, site16, [fourteen], AT).allowed_mask == (False,)
    assert evaluate_records(iss, site16, [flagged], AT).allowed_mask == (False,)
    # research on minors follows the site's national law (minor_age, guardian consent)
    run = make_run()
    recs = [fourteen, record(age=17, guardian_consent=True), record(age=18)]
    verdict = evaluate_records(run, make_site(), recs, AT)
    assert verdict.allowed_mask == (False, True, True)
    assert verdict.excluded_by_rule["GDPR-MINORS"] == 1
    assert "GDPR-8" not in verdict.excluded_by_rule  # not applicable to research
    assert evaluate_records(run, make_site(minor_age=14), [fourteen], AT).allowed_mask == (True,)
    assert evaluate_records(run, make_site(**national), [fourteen], AT).allowed_mask == (True,)
    # unknown age at a site with minors: left out and counted, never silently an adult
    unknown = record(age=None, minor=None)
    verdict = evaluate_records(run, make_site(), [unknown], AT)
    assert verdict.allowed_mask == (False,)
    assert verdict.excluded_by_rule["PRIV-AGE-UNKNOWN"] == 1
    adults_only = make_site(data_subjects={"patients"})
    assert evaluate_records(run, adults_only, [unknown], AT).allowed_mask == (True,)
    # DPDP: under 18 needs verifiable parental consent; never for tracking purposes
    india = make_site("site-in", approved_purposes={RESEARCH, "profiling.behavioural"})
    seventeen_ok = record(age=17, guardian_consent=True)
    assert evaluate_records(run, india, [seventeen_ok], AT).allowed_mask == (True,)
    tracking = make_run(purpose="profiling.behavioural")
    verdict = evaluate_records(
        tracking,
        india,
        [record(age=17, guardian_consent=True, consented_purposes={"profiling.behavioural"})],
        AT,
    )
    assert verdict.excluded_by_rule["DPDP-9-1"] == 1


def test_unknown_collection_date_is_counted_not_silently_kept():
    run = make_run()
    undated = record(collected_at=None)
    verdict = evaluate_records(run, make_site(), [undated, record()], AT)
    assert verdict.allowed_mask == (False, True)
    assert verdict.excluded_by_rule["PRIV-DATE-UNKNOWN"] == 1
    # a site that declares it records no collection dates keeps them, and the decision says so
    verdict = evaluate_records(run, make_site(collection_dates_recorded=False), [undated], AT)
    assert verdict.allowed_mask == (True,)
    (d,) = [d for d in verdict.decisions if d.rule_id == "PRIV-DATE-UNKNOWN"]
    assert d.reason.startswith("not applicable") and "collection dates" in d.reason


def test_objection_restriction_and_opt_out_exclude_from_their_date_on():
    run = make_run()  # public task (e), research: Art. 21(1) and 21(6) both open
    site = make_site()
    recs = [
        record(objected_at=AT - timedelta(days=1)),
        record(objected_at=AT + timedelta(days=1)),  # objects after this round
        record(restricted_at=AT - timedelta(days=2)),
        record(opted_out_at=AT),
        record(),
    ]
    verdict = evaluate_records(run, site, recs, AT)
    assert verdict.allowed_mask == (False, True, False, False, True)
    counts = verdict.excluded_by_rule
    assert (counts["GDPR-21"], counts["GDPR-18"], counts["GDPR-OPT-OUT"]) == (1, 1, 1)
    # on consent (a) there is no Art. 21(1) objection outside research: withdrawal instead
    care = make_run(purpose="care.treatment", lawful_basis="a", special_category_condition="a")
    consent_site = make_site(lawful_basis="a", art9_condition="a")
    verdict = evaluate_records(care, consent_site, [record(objected_at=AT)], AT)
    assert "GDPR-21" not in verdict.excluded_by_rule
    # the columns round-trip through the columnar reader
    (rec,) = records_from_columns(
        {
            "record_id": ["x"],
            "objected_at": ["2026-05-01"],
            "restricted_at": [None],
            "opted_out_at": [""],
        }
    )
    assert rec.objected_at == datetime(2026, 5, 1, tzinfo=UTC) and rec.restricted_at is None


def test_dpdp_voluntary_use_honours_withdrawal_only():
    site = make_site("site-in", dpdp_ground="7(a)", approved_purposes={"care.treatment"})
    run = make_run(purpose="care.treatment", special_category_condition="a")
    recs = [record(consented_purposes=set()), record(consent_withdrawn_at=AT - timedelta(days=1))]
    assert evaluate_records(run, site, recs, AT).allowed_mask == (True, False)
    # on the research exemption the consent rule does not apply at all
    site = make_site("site-in", dpdp_ground="17(2)(b)")
    verdict = evaluate_records(make_run(), site, recs, AT)
    assert verdict.allowed_mask == (True, True) and "DPDP-6-4" not in verdict.excluded_by_rule


def test_naive_and_aware_times_mix():
    run = make_run(**CONSENT_RUN)
    naive_at = datetime(2026, 6, 1, 12, 0)
    rec = record(consent_withdrawn_at="2026-06-01T11:00:00+00:00", collected_at=date(2026, 1, 1))
    site = make_site(**CONSENT_SITE)
    assert evaluate_records(run, site, [rec], naive_at).allowed_mask == (False,)
    later = datetime(2026, 6, 1, 13, 0, tzinfo=UTC).astimezone()  # local zone, same instant type
    assert evaluate_records(run, site, [record()], later).allowed_mask == (True,)


def test_verdict_decisions_serialise_counts_never_masks_or_ids():
    run = make_run(**CONSENT_RUN)
    recs = [record(record_id="secret-pseudonym-1", erasure_requested=True), record()]
    verdict = evaluate_records(run, make_site(**CONSENT_SITE), recs, AT)
    text = json.dumps([d.to_dict() for d in verdict.decisions])
    assert "secret-pseudonym-1" not in text and "mask" not in text
    assert verdict.excluded_by_rule["GDPR-17"] == 1
    for d in verdict.decisions:
        assert "excluded_mask" not in d.to_dict()
    assert suppress_small_counts(verdict.excluded_by_rule, 5) == {
        "GDPR-17": "<5",
        "GDPR-21": 0,
        "GDPR-18": 0,
        "GDPR-OPT-OUT": 0,
        "GDPR-7-3": 0,
        "GDPR-MINORS": 0,
        "PRIV-AGE-UNKNOWN": 0,
        "GDPR-5-1-e": 0,
        "PRIV-DATE-UNKNOWN": 0,
    }


def test_empty_site():
    verdict = evaluate_records(make_run(), make_site(), [], AT)
    assert verdict.n_allowed == 0 and verdict.allowed_mask == ()
    assert all(d.outcome is Outcome.ALLOW for d in verdict.decisions)


def test_thousands_of_records_fast():
    run = make_run(**CONSENT_RUN)
    site = make_site(law_packs=("gdpr", "dpdp"), dpdp_ground="consent", **CONSENT_SITE)
    n = 20_000
    cols = {
        "record_id": [f"p{i}" for i in range(n)],
        "consented_purposes": [RESEARCH if i % 10 else "" for i in range(n)],
        "consent_withdrawn_at": [AT - timedelta(days=1) if i % 17 == 0 else None for i in range(n)],
        "age": [i % 90 for i in range(n)],
        "guardian_consent": [i % 3 == 0 for i in range(n)],
        "collected_at": [AT - timedelta(days=i % 5000) for i in range(n)],
        "erasure_requested": [i % 101 == 0 for i in range(n)],
    }
    start = time.perf_counter()
    recs = records_from_columns(cols)
    verdict = evaluate_records(run, site, recs, AT)
    elapsed = time.perf_counter() - start
    assert verdict.n_total == n
    assert sum(verdict.excluded_by_rule.values()) == verdict.n_excluded
    assert elapsed < 5.0, elapsed


# ---- RecordMeta itself ------------------------------------------------------


def test_record_meta_normalises_inputs():
    rec = RecordMeta(
        record_id=17,  # type: ignore[arg-type]
        consented_purposes="research.model-training; care.treatment",  # type: ignore[arg-type]
        consent_withdrawn_at="2026-01-01",  # type: ignore[arg-type]
        age=15.0,  # type: ignore[arg-type]
        minor=1,  # type: ignore[arg-type]
        guardian_consent=None,  # type: ignore[arg-type]
        collected_at=date(2025, 1, 1),  # type: ignore[arg-type]
        erasure_requested="2026-02-01T00:00:00+01:00",  # type: ignore[arg-type]
    )
    assert rec.record_id == "17"
    assert rec.consented_purposes == {RESEARCH, "care.treatment"}
    assert rec.consent_withdrawn_at == datetime(2026, 1, 1, tzinfo=UTC)
    assert rec.age == 15 and rec.minor is True and rec.guardian_consent is False
    assert rec.erasure_requested == datetime(2026, 1, 31, 23, 0, tzinfo=UTC)
    assert RecordMeta("x", age=float("nan")).age is None
    with pytest.raises(ValueError):
        RecordMeta("x", age=-1)
    with pytest.raises(ValueError):
        RecordMeta("x", age=12.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        RecordMeta("x", age=True)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        RecordMeta("x", collected_at=3)  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        rec.age = 3  # type: ignore[misc]


def test_records_from_columns_checks_shape():
    with pytest.raises(ValueError, match="record_id"):
        records_from_columns({"age": [1]})
    with pytest.raises(ValueError, match="unknown record columns"):
        records_from_columns({"record_id": ["a"], "name": ["Jane"]})
    with pytest.raises(ValueError, match="has 2 values"):
        records_from_columns({"record_id": ["a"], "age": [1, 2]})
    assert records_from_columns({"record_id": []}) == []


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "consented": st.booleans(),
                "withdrawn": st.sampled_from([None, -5, 0, 5]),
                "age": st.one_of(st.none(), st.integers(0, 100)),
                "minor": st.one_of(st.none(), st.booleans()),
                "guardian": st.booleans(),
                "collected": st.one_of(st.none(), st.integers(0, 6000)),
                "erasure": st.sampled_from([False, True, -1, 1]),
            }
        ),
        max_size=40,
    ),
    st.sampled_from([("gdpr",), ("dpdp",), ("gdpr", "dpdp")]),
)
def test_mask_and_counts_agree(rows, packs):
    def when(days):
        return None if days is None else AT + timedelta(days=days)

    recs = [
        RecordMeta(
            record_id=str(i),
            consented_purposes={RESEARCH} if r["consented"] else set(),
            consent_withdrawn_at=when(r["withdrawn"]),
            age=r["age"],
            minor=r["minor"],
            guardian_consent=r["guardian"],
            collected_at=when(None if r["collected"] is None else -r["collected"]),
            erasure_requested=r["erasure"]
            if isinstance(r["erasure"], bool)
            else when(r["erasure"]),
        )
        for i, r in enumerate(rows)
    ]
    run = make_run(**CONSENT_RUN)
    site = make_site(law_packs=packs, dpdp_ground="consent", **CONSENT_SITE)
    verdict = evaluate_records(run, site, recs, AT)
    assert sum(verdict.excluded_by_rule.values()) == verdict.n_excluded
    masks = [d.excluded_mask for d in verdict.decisions if d.excluded_mask is not None]
    for i, allowed in enumerate(verdict.allowed_mask):
        assert allowed == (not any(m[i] for m in masks))
