"""The DPIA gate (GDPR-35): a versioned dpia.toml, approved and current, or no run."""

from __future__ import annotations

import json
import tomllib
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from policy_helpers import make_run, make_site

from policies import (
    EXAMPLE_RUN,
    DeclarationError,
    eligible_sites,
    evaluate_run,
    load_run_declaration,
    parse_run_declaration,
)
from policies.dpia import DpiaRecord, DpiaRisk, load_dpia

DPIA_TOML = EXAMPLE_RUN.with_name("dpia.toml")
TODAY = date(2026, 11, 30)


def dpia(**changes: Any) -> DpiaRecord:
    data = load_dpia(DPIA_TOML).model_dump()
    scope = changes.pop("scope", None)
    if scope:
        data["scope"] = {**data["scope"], **scope}
    data.update(changes)
    return DpiaRecord.model_validate(data)


def gate(run=None, sites=None, transport: str | None = "simulation", today: date = TODAY):
    run = run if run is not None else make_run()
    sites = sites if sites is not None else [make_site("site"), make_site("site-in")]
    decisions = evaluate_run(run, sites, transport=transport, today=today)
    (d,) = [d for d in decisions if d.rule_id == "GDPR-35"]
    return d, decisions, sites


def test_the_example_dpia_is_approved_current_and_lets_the_example_run_start():
    d, decisions, sites = gate()
    assert d.allowed and d.site_id is None, d.reason
    assert "DPIA-EXAMPLE-2025-001 v2 approved" in d.reason and "2027-11-30" in d.reason
    assert eligible_sites(decisions, sites) == sites
    assert d.references[0] == "GDPR Art. 35(1)"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"sites": [make_site("site", site_id="site-new")]}, "new site(s) not assessed: site-new"),
        (
            {
                "sites": [
                    make_site(
                        "site",
                        site_id="site-0",
                        country="IT",
                        art6_3_law="IT: a law",
                        art9_law="IT: a law",
                        minors_law="IT: a law",
                    )
                ]
            },
            "new country(ies) not assessed: IT",
        ),
        ({"run": make_run(epsilon=9.0)}, "epsilon 9 is higher than the 8 assessed"),
        (
            {"run": make_run(purpose="public-health.surveillance", special_category_condition="i")},
            "new purpose not assessed: public-health.surveillance",
        ),
        ({"transport": "insecure"}, "transport 'insecure' was not assessed"),
        ({"today": date(2027, 12, 1)}, "its review date 2027-11-30 has passed"),
    ],
)
def test_a_change_outside_the_scope_makes_the_dpia_stale_and_stops_the_run(change, expected):
    d, decisions, sites = gate(**change)
    assert d.denied and d.site_id is None
    assert "DPIA DPIA-EXAMPLE-2025-001 v2 is stale" in d.reason and expected in d.reason
    assert "approve a new version" in d.reason
    assert eligible_sites(decisions, sites) == []  # a run-level denial: nobody trains


def test_the_review_date_on_both_sides():
    assert gate(today=date(2027, 11, 30))[0].allowed
    assert gate(today=date(2027, 11, 30) + timedelta(days=1))[0].denied


def test_a_lower_epsilon_and_fewer_sites_stay_covered():
    assert gate(run=make_run(epsilon=0.5), sites=[make_site("site")])[0].allowed


def test_a_non_private_run_needs_a_dpia_that_assessed_one():
    run = make_run(dp_enabled=False, epsilon=None, delta=None, allow_non_private=True)
    assert gate(run=run)[0].allowed  # the example assessed --no-dp on public data
    strict = make_run(
        dp_enabled=False,
        epsilon=None,
        delta=None,
        allow_non_private=True,
        dpia=dpia(scope={"non_private": False}).model_dump(),
    )
    d = gate(run=strict)[0]
    assert d.denied and "non-private (no differential privacy), which was not assessed" in d.reason


def test_unknown_transport_is_left_to_whoever_knows_it():
    assert gate(transport=None)[0].allowed


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"status": "draft"}, "its status is draft, not approved"),
        ({"decision": "refer-art-36"}, "referred to the supervisory authority (GDPR Art. 36"),
        ({"decision": "reject"}, "it was rejected"),
        ({"dpo_advice": None}, "no DPO advice and date are recorded (GDPR Art. 35(2))"),
        ({"conditions": ()}, "approved with conditions but names none"),
    ],
)
def test_an_unapproved_dpia_stops_the_run(changes, expected):
    d, decisions, sites = gate(run=make_run(dpia=dpia(**changes).model_dump()))
    assert d.denied and "is not approved" in d.reason and expected in d.reason
    assert eligible_sites(decisions, sites) == []


def test_health_data_without_a_dpia_is_refused_other_data_is_not():
    run = make_run(dpia=None)
    d, _, _ = gate(run=run)
    assert d.denied and "no DPIA" in d.reason and "special-category" in d.reason
    plain = [make_site("site", data_categories=frozenset({"demographic"}))]
    assert gate(run=run, sites=plain)[0].allowed


def test_a_site_refused_by_another_rule_does_not_make_the_dpia_stale():
    # a site in China without SCCs is denied by the transfer rules; the gate looks only at
    # the sites that will take part
    cn = make_site("site", site_id="site-cn", country="CN", transfer_safeguards=())
    d, decisions, _ = gate(sites=[make_site("site"), cn])
    assert d.allowed, d.reason
    assert [s.site_id for s in eligible_sites(decisions, [make_site("site"), cn])] == ["site-de-01"]


def test_the_declaration_carries_the_dpia_and_its_hash_survives_the_wire():
    run = load_run_declaration(EXAMPLE_RUN)
    assert run.dpia is not None and run.dpia.version == 2 and run.dpia_id == run.dpia.id
    again = parse_run_declaration(json.loads(run.model_dump_json()))
    assert again.sha256() == run.sha256()  # what each site approves and signs
    newer = make_run(dpia=dpia(version=3).model_dump())
    assert newer.sha256() != run.sha256()  # a new DPIA version needs a new approval


def _declaration(tmp_path: Path, dpia_text: str | None, **extra: str) -> Path:
    text = EXAMPLE_RUN.read_text(encoding="utf-8")
    for key, value in extra.items():
        text = text.replace(f'{key} = "DPIA-EXAMPLE-2025-001"', f"{key} = {value}")
    path = tmp_path / "run.toml"
    path.write_text(text, encoding="utf-8")
    if dpia_text is not None:
        (tmp_path / "dpia.toml").write_text(dpia_text, encoding="utf-8")
    return path


def test_dpia_file_errors_are_one_line_naming_the_file_and_field(tmp_path):
    with pytest.raises(DeclarationError) as err:
        load_run_declaration(_declaration(tmp_path, None))
    assert "dpia_file" in str(err.value) and "dpia.toml" in str(err.value)
    assert "not found" in str(err.value) and "\n" not in str(err.value)
    bad = DPIA_TOML.read_text(encoding="utf-8").replace(
        'likelihood_before = "probable"', 'likelihood_before = "often"', 1
    )
    with pytest.raises(DeclarationError) as err:
        load_run_declaration(_declaration(tmp_path, bad))
    assert "risks[0].likelihood_before" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DeclarationError, match="dpia_id"):
        load_run_declaration(
            _declaration(tmp_path, DPIA_TOML.read_text(encoding="utf-8"), dpia_id='"DPIA-OTHER"')
        )


def test_risk_levels_follow_likelihood_times_severity():
    assert DpiaRisk.level("probable", "severe") == "high"
    assert DpiaRisk.level("possible", "significant") == "medium"
    assert DpiaRisk.level("remote", "severe") == "medium"
    assert DpiaRisk.level("remote", "minimal") == "low"
    example = tomllib.loads(DPIA_TOML.read_text(encoding="utf-8"))
    ids = [r["id"] for r in example["risks"]]
    titles = " ".join(r["title"] for r in example["risks"])
    assert len(set(ids)) == len(ids)
    for risk in ("Code executed at the sites", "Site insiders", "Later use of the model"):
        assert risk in titles
