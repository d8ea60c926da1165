"""The party registry and agreements gate (GDPR-26-28): a run is refused, in one line
naming the party and the document, when a document its roles need is missing, expired
or of the wrong SCC module."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest
from policy_helpers import make_run, make_site

from policies import eligible_sites, evaluate_run, example_run_declaration
from policies.parties import PartyRegistry, registry_findings, scc_module

TODAY = date(2026, 11, 30)
COORD, DE, IN = "LEI-EXAMPLE-CONSORTIUM-0001", "DE-HRB-EXAMPLE-0002", "IN-CIN-EXAMPLE-0003"


def registry(
    parties: dict[str, dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    drop: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The example registry, with parties changed (by entity id) and documents replaced."""
    data = example_run_declaration().registry.model_dump()  # type: ignore[union-attr]
    for p in data["parties"]:
        p.update((parties or {}).get(p["entity_id"], {}))
    if documents is not None:
        data["documents"] = documents
    data["documents"] = [d for d in data["documents"] if d["kind"] not in drop]
    return data


def gate(reg: dict[str, Any] | None, sites=None, today: date = TODAY):
    run = make_run(registry=reg)
    sites = sites if sites is not None else [make_site("site"), make_site("site-in")]
    decisions = evaluate_run(run, sites, transport="simulation", today=today)
    (d,) = [d for d in decisions if d.rule_id == "GDPR-26-28"]
    return d, eligible_sites(decisions, sites)


def test_the_example_registry_lets_the_example_run_start():
    d, eligible = gate(registry())
    assert d.allowed and len(eligible) == 2, d.reason


def test_no_registry_refuses_the_run():
    d, eligible = gate(None)
    assert d.denied and "no party registry" in d.reason and eligible == []


def test_a_site_no_party_runs_is_refused_and_a_manifest_may_link_itself():
    stray = make_site("site", site_id="site-99")
    d, eligible = gate(registry(), [stray])
    assert d.denied and d.reason.startswith("site-99: no party in the registry") and not eligible
    linked = make_site("site", site_id="site-99", legal_entity_id=DE)
    assert gate(registry(), [linked])[0].allowed


def test_missing_scc_names_the_party_and_the_document():
    d, eligible = gate(registry(drop=("scc",)))
    assert d.denied and eligible == []
    assert d.reason.startswith(
        f"Example Institute of Medical Sciences ({IN}): no standard contractual clauses"
    )
    assert "(module C2C)" in d.reason and "\n" not in d.reason
    # without the Indian site, nobody in a third country receives the model
    assert gate(registry(drop=("scc",)), [make_site("site")])[0].allowed


def test_an_scc_module_that_does_not_fit_the_roles_is_refused():
    docs = registry()["documents"]
    wrong = [dict(d, scc_module="C2P") if d["kind"] == "scc" else d for d in docs]
    d, _ = gate(registry(documents=wrong))
    assert d.denied and "does not fit the roles (needs module C2C)" in d.reason
    # the Indian party as a processor: the coordinator (controller) to processor is C2P,
    # and a processor needs an Art. 28 contract
    procs = {IN: {"role": "processor"}}
    d, _ = gate(registry(procs, documents=wrong))
    assert d.denied and "Art. 28(3) processor contract" in d.reason


def test_expiry_on_both_sides_of_the_date():
    docs = registry()["documents"]
    ending = [
        dict(d, expires_on=date(2026, 12, 31)) if d["kind"] == "art26-arrangement" else d
        for d in docs
    ]
    assert gate(registry(documents=ending), today=date(2026, 12, 31))[0].allowed
    d, eligible = gate(registry(documents=ending), today=date(2027, 1, 1))
    assert d.denied and eligible == []
    assert "GDPR Art. 26 joint-controller arrangement JCA-EXAMPLE-2026-01" in d.reason
    assert "expired on 2026-12-31" in d.reason


def test_joint_controllers_need_an_arrangement_binding_all_of_them():
    d, _ = gate(registry(drop=("art26-arrangement",)))
    assert d.denied and "no GDPR Art. 26 joint-controller arrangement" in d.reason
    partial = [
        dict(d, parties=[COORD, DE]) if d["kind"] == "art26-arrangement" else d
        for d in registry()["documents"]
    ]
    assert gate(registry(documents=partial))[0].denied  # the Indian party is not bound
    assert gate(registry(documents=partial), [make_site("site")])[0].allowed


def test_a_processor_needs_its_contracts():
    procs = {DE: {"role": "processor"}}
    d, _ = gate(registry(procs), [make_site("site")])
    assert d.denied and "no GDPR Art. 28(3) processor contract with a controller" in d.reason
    contract = {
        "kind": "art28-contract",
        "ref": "DPA-1",
        "parties": [COORD, DE],
        "signed_on": date(2026, 1, 1),
    }
    docs = [*registry()["documents"], contract]
    assert gate(registry(procs, documents=docs), [make_site("site")])[0].allowed
    # at a DPDP site the processor also needs the s.8(2) contract (the gate is in the GDPR
    # pack: it runs where a GDPR site takes part)
    in_site = make_site("site-in", legal_entity_id=DE)
    d, _ = gate(registry(procs, documents=docs), [make_site("site"), in_site])
    assert d.denied and "DPDP s.8(2) processor contract" in d.reason


def test_missing_dpo_and_representative_are_findings_not_refusals():
    reg = PartyRegistry.model_validate(registry())
    lines = registry_findings(reg, [IN])
    assert any(
        line.startswith("Example Institute of Medical Sciences") and "DPO" in line for line in lines
    )
    assert any("Art. 27" in line and IN in line for line in lines)
    assert registry_findings(reg, [IN], involved=[COORD, DE]) == []
    assert gate(registry())[0].allowed  # the example's Indian party lacks both: still allowed


@pytest.mark.parametrize(
    ("exporter", "importer", "module"),
    [
        ("controller", "joint-controller", "C2C"),
        ("joint-controller", "processor", "C2P"),
        ("processor", "processor", "P2P"),
        ("processor", "controller", "P2C"),
    ],
)
def test_scc_modules_follow_the_roles(exporter, importer, module):
    assert scc_module(exporter, importer) == module
