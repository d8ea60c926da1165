"""Commencement: which provisions apply on a date, and the status of a rule's decision."""

from __future__ import annotations

from datetime import date

import pytest

from policies import RULES, in_force_from, legal_status
from policies.commencement import BINDING, PARTLY, READINESS, commencement_data

BEFORE_DPDP = date(2026, 11, 30)  # the Act's substantive sections not yet in force
AFTER_DPDP = date(2027, 5, 13)


@pytest.mark.parametrize(
    ("reference", "start"),
    [
        ("GDPR Art. 9(2)", date(2018, 5, 25)),
        ("DPDP Act 2023 s.2(f)", date(2025, 11, 13)),
        ("DPDP Act 2023 s.6(9)", date(2026, 11, 13)),
        ("DPDP Act 2023 s.27(1)(d)", date(2026, 11, 13)),
        ("DPDP Rules 2025 r.4", date(2026, 11, 13)),
        ("DPDP Rules 2025 r.18", date(2025, 11, 13)),
        ("DPDP Act 2023 s.6(1)", date(2027, 5, 13)),  # the instrument's default
        ("DPDP Act 2023 s.27(1)(a)", date(2027, 5, 13)),  # only (d) applies early
        ("DPDP Act 2023 s.8(7)(a)", date(2027, 5, 13)),
        ("DPDP Rules 2025 r.10", date(2027, 5, 13)),  # not r.1
        ("DPDP Rules 2025 r.6(1)(e)", date(2027, 5, 13)),
        ("DPDP Act 2023 s.20", date(2025, 11, 13)),  # not s.2
    ],
)
def test_in_force_from(reference, start):
    assert in_force_from(reference) == start


def test_every_cited_provision_has_a_commencement_date():
    for rule in RULES.values():
        for ref in rule.references:
            assert in_force_from(ref) is not None, (rule.id, ref)
    data = commencement_data()
    assert data.source and data.as_of >= date(2026, 11, 13)


def test_status_on_both_sides_of_a_date():
    refs = RULES["DPDP-8-7"].references
    assert refs == ("DPDP Act 2023 s.8(7)(a)", "DPDP Act 2023 s.8(8)")
    before = legal_status(refs, BEFORE_DPDP)
    assert before.status == READINESS and before.describe() == "readiness (applies from 2027-05-13)"
    assert legal_status(refs, date(2027, 5, 12)).status == READINESS
    assert legal_status(refs, AFTER_DPDP).status == BINDING
    # Consent Managers (s.6(9), r.4) apply from 13 Nov 2026
    cm = ("DPDP Act 2023 s.6(9)", "DPDP Rules 2025 r.4")
    assert legal_status(cm, date(2026, 11, 12)).status == READINESS
    assert legal_status(cm, date(2026, 11, 13)).status == BINDING
    # a definition in force, the duty not yet: partly in force, naming what is pending
    children = legal_status(RULES["DPDP-9-1"].references, BEFORE_DPDP)
    assert children.status == PARTLY
    assert ("DPDP Act 2023 s.9(1)", date(2027, 5, 13)) in children.pending
    assert all(
        legal_status(r.references, BEFORE_DPDP).status == BINDING
        for r in RULES.values()
        if r.pack == "gdpr"
    )


def test_corrected_citations():
    assert "DPDP Act 2023 s.6(5)" in RULES["DPDP-6-4"].references
    assert "DPDP Act 2023 s.8(7)(b)" not in RULES["DPDP-8-7"].references
    assert all("r.8(1)" not in ref for rule in RULES.values() for ref in rule.references)


def test_compliance_doc_lists_every_rule_with_its_references():
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "compliance.md").read_text(encoding="utf-8")
    for rule in RULES.values():
        line = next((ln for ln in text.splitlines() if ln.startswith(f"| `{rule.id}` |")), None)
        assert line is not None, f"docs/compliance.md has no row for {rule.id}"
        assert "; ".join(rule.references) in line, rule.id
        assert legal_status(rule.references, BEFORE_DPDP).describe() in line, rule.id
