"""The party registry of a run: who each party is, its role, and the signed documents its
role needs (GDPR Art. 26, 28, 46; DPDP s.8(2)), with their expiry dates.

The registry sits in the run declaration (``[registry]``: ``[[registry.parties]]`` and
``[[registry.documents]]``); a site links itself to its party by ``legal_entity_id`` in
its manifest, or the party lists the site's id in ``site_ids``. What a role needs:

* two or more controllers (controller and joint controllers): an Art. 26 arrangement
  binding all of them;
* a processor: an Art. 28 contract (and, under DPDP, the s.8(2) contract) with a
  controller;
* a party in a third country without adequacy that receives the model: SCCs binding it,
  of the module that fits the roles (controller to controller: C2C, module 1; controller
  to processor: C2P, module 2; processor to processor: P2P, module 3; processor to
  controller: P2C, module 4).

A missing DPO contact and a missing Art. 27 representative (a party outside the EEA
whose site is under GDPR) are findings for the report, not refusals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import date
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["controller", "joint-controller", "processor"]
DocumentKind = Literal["art26-arrangement", "art28-contract", "scc", "dpdp-processor-contract"]
SccModule = Literal["C2C", "C2P", "P2P", "P2C"]
_Text = Annotated[str, Field(min_length=1, max_length=500)]
_Code = Annotated[str, Field(pattern=r"^[A-Z]{2}$")]

DOCUMENT_NAMES = {
    "art26-arrangement": "GDPR Art. 26 joint-controller arrangement",
    "art28-contract": "GDPR Art. 28(3) processor contract",
    "scc": "standard contractual clauses (GDPR Art. 46(2)(c))",
    "dpdp-processor-contract": "DPDP s.8(2) processor contract",
}


def scc_module(exporter: str, importer: str) -> SccModule:
    """The SCC module (Decision (EU) 2021/914) that fits an exporter's and importer's roles."""
    e = "P" if exporter == "processor" else "C"
    i = "P" if importer == "processor" else "C"
    module: SccModule = f"{e}2{i}"  # type: ignore[assignment]
    return module


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RegisteredParty(_Model):
    """One legal entity of the run and its role in this processing."""

    entity_id: _Text
    """Legal entity identifier (an LEI, or the national register number)."""
    name: _Text
    country: _Code
    role: Role
    """Its role in this run's processing (federated training of the model)."""
    site_ids: tuple[_Text, ...] = ()
    """The sites this party runs (linked to manifests by site id)."""
    coordinator: bool = False
    """The party that runs the server and sends the model out (the exporter)."""
    dpo_contact: _Text | None = None
    art27_representative: _Text | None = None
    """The party's representative in the Union (GDPR Art. 27), where it needs one."""


class Document(_Model):
    """A signed document a role needs, with the parties it binds."""

    kind: DocumentKind
    ref: _Text
    parties: tuple[_Text, ...] = Field(min_length=1)
    """Entity ids of the parties it binds."""
    signed_on: date
    expires_on: date | None = None
    scc_module: SccModule | None = None
    """For SCCs: the module (C2C, C2P, P2P, P2C)."""


class PartyRegistry(_Model):
    parties: tuple[RegisteredParty, ...] = Field(min_length=1)
    documents: tuple[Document, ...] = ()

    def party_of_site(self, site_id: str, entity_id: str | None) -> RegisteredParty | None:
        for p in self.parties:
            if (entity_id is not None and p.entity_id == entity_id) or site_id in p.site_ids:
                return p
        return None

    def coordinator(self) -> RegisteredParty | None:
        return next((p for p in self.parties if p.coordinator), None)


def _valid(doc: Document, today: date) -> bool:
    return doc.expires_on is None or doc.expires_on >= today


def _find(registry: PartyRegistry, kind: str, binds: Sequence[str]) -> list[Document]:
    return [d for d in registry.documents if d.kind == kind and set(binds) <= set(d.parties)]


def _need(
    registry: PartyRegistry,
    kind: str,
    binds: Sequence[str],
    who: RegisteredParty,
    today: date,
    module: str | None = None,
) -> str | None:
    """One line naming the party and the document, or None if a valid one is on file."""
    docs = _find(registry, kind, binds)
    name = DOCUMENT_NAMES[kind]
    label = f"{who.name} ({who.entity_id})"
    if not docs:
        return (
            f"{label}: no {name}"
            + (f" (module {module})" if module else "")
            + " binding "
            + ", ".join(binds)
            + " is on file"
        )
    if module is not None:
        fitting = [d for d in docs if d.scc_module == module]
        if not fitting:
            have = ", ".join(f"{d.ref} module {d.scc_module or 'not stated'}" for d in docs)
            return f"{label}: {name} {have} does not fit the roles (needs module {module})"
        docs = fitting
    if not any(_valid(d, today) for d in docs):
        d = max(docs, key=lambda x: x.expires_on or date.max)
        return f"{label}: {name} {d.ref} expired on {d.expires_on}"
    return None


def registry_problems(
    registry: PartyRegistry,
    sites: Sequence[tuple[str, str | None, str]],
    third_country: Callable[[str], bool],
    today: date,
) -> list[str]:
    """Why the registry does not allow this run (empty: it does), one line each.

    ``sites``: (site id, legal entity id or None, law packs joined by spaces) of every site
    that will take part; ``third_country(code)``: whether sending the model to a party in
    that country is a transfer that needs SCCs (outside the EEA, no adequacy)."""
    out: list[str] = []
    involved: dict[str, RegisteredParty] = {}
    dpdp: set[str] = set()
    coordinator = registry.coordinator()
    if coordinator is None:
        out.append("the registry names no coordinator (coordinator = true)")
    else:
        involved[coordinator.entity_id] = coordinator
    for site_id, entity, packs in sites:
        party = registry.party_of_site(site_id, entity)
        if party is None:
            out.append(
                f"{site_id}: no party in the registry runs this site (add its "
                "legal_entity_id or list the site in a party's site_ids)"
            )
            continue
        involved[party.entity_id] = party
        if "dpdp" in packs.split():
            dpdp.add(party.entity_id)
    controllers = [p for p in involved.values() if p.role != "processor"]
    if len(controllers) >= 2:
        problem = _need(
            registry, "art26-arrangement", [p.entity_id for p in controllers], controllers[0], today
        )
        if problem:
            out.append(problem)
    ctrl = {c.entity_id for c in controllers}
    for p in involved.values():
        if p.role != "processor":
            continue
        kinds = ["art28-contract"] + (["dpdp-processor-contract"] if p.entity_id in dpdp else [])
        for kind in kinds:
            docs = [
                d
                for d in registry.documents
                if d.kind == kind and p.entity_id in d.parties and set(d.parties) & ctrl
            ]
            problem = (
                _need(registry, kind, [p.entity_id], p, today)
                if docs
                else f"{p.name} ({p.entity_id}): no {DOCUMENT_NAMES[kind]} with a controller "
                "of the run is on file"
            )
            if problem:
                out.append(problem)
    if coordinator is not None:
        for p in involved.values():
            if p is coordinator or not third_country(p.country):
                continue
            module = scc_module(coordinator.role, p.role)
            problem = _need(registry, "scc", [coordinator.entity_id, p.entity_id], p, today, module)
            if problem:
                out.append(problem)
    return out


def registry_findings(
    registry: PartyRegistry, gdpr_outside_eea: Sequence[str], involved: Sequence[str] | None = None
) -> list[str]:
    """What a DPO must look at but that does not stop the run: a party without a DPO
    contact (GDPR Art. 37(1)(c); DPDP s.8(9)), a party outside the EEA under GDPR without
    an Art. 27 representative (``gdpr_outside_eea``: their entity ids); only the parties
    in ``involved`` (entity ids) where it is given."""
    out = []
    for p in registry.parties:
        if involved is not None and p.entity_id not in involved:
            continue
        if not p.dpo_contact:
            out.append(
                f"{p.name} ({p.entity_id}) names no DPO contact (GDPR Art. 37(1)(c), "
                "37(7); DPDP Act 2023 s.8(9))"
            )
        if p.entity_id in gdpr_outside_eea and not p.art27_representative:
            out.append(
                f"{p.name} ({p.entity_id}) is outside the EEA and processes under GDPR "
                "but names no representative in the Union (GDPR Art. 27)"
            )
    return out
