"""An incident record: what fedmeta saw, when the controller became aware of it, and the
notification decision (GDPR Art. 33(5): every breach is documented, notified or not)."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Kind = Literal[
    "log-verification-failed",
    "receipt-mismatch",
    "model-hash-mismatch",
    "evidence-mismatch",
    "epsilon-overspend",
    "unknown-node",
    "insecure-transport",
    "update-rejected",
    "unapproved-code",
    "server-key-mismatch",
]

KIND_TEXT: dict[str, str] = {
    "log-verification-failed": "an audit log failed verification (possible tampering)",
    "receipt-mismatch": "a receipt held by one party does not match another party's log",
    "model-hash-mismatch": "the final model file is not the model the server signed",
    "evidence-mismatch": "the run's files disagree with the signed evidence",
    "epsilon-overspend": "a site's privacy ledger is past its epsilon budget",
    "unknown-node": "a node the server could not identify tried to take part",
    "insecure-transport": "the run used transport without TLS or node authentication",
    "update-rejected": "a site's update was rejected (norm bound, shape or values)",
    "unapproved-code": "a site was sent code it had not approved (an app, task or model) "
    "and refused it",
    "server-key-mismatch": "a site received a round not signed by the federation's pinned "
    "server key and refused it",
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Decision(_Model):
    """The notification decision, with its reasons (Art. 33(5))."""

    notify_authority: bool
    """GDPR Art. 33(1): notify the supervisory authority."""
    notify_subjects: bool
    """GDPR Art. 34(1): tell the data subjects (a high risk to them)."""
    notify_dpdp_board: bool = False
    """DPDP Rules r.7: intimate the Data Protection Board (and each affected principal)."""
    reasons: str = Field(min_length=10, max_length=4000)
    decided_by: str = Field(min_length=1, max_length=200)
    decided_at: datetime


class Incident(_Model):
    id: str
    kind: Kind
    run_id: str
    site_id: str | None
    summary: str
    """One line: what was seen, never a record value or id."""
    source: str
    """Where fedmeta saw it (file, log entry, check)."""
    occurred_at: datetime | None
    """When the event happened, where a signed entry says so."""
    aware_at: datetime
    """When the controller became aware (the scan that opened the incident): the clocks
    of GDPR Art. 33(1) and DPDP Rules r.7(2)(b) run from here."""
    dpdp: bool = False
    """A site under the DPDP pack is concerned (the r.7 clock applies)."""
    decision: Decision | None = None

    @staticmethod
    def make_id(kind: str, run_id: str, site_id: str | None, source: str) -> str:
        digest = hashlib.sha256(f"{kind}\n{run_id}\n{site_id}\n{source}".encode()).hexdigest()
        return f"INC-{digest[:10]}"

    @property
    def status(self) -> str:
        if self.decision is None:
            return "open: decision pending"
        d = self.decision
        told = [
            w
            for w, yes in (
                ("authority", d.notify_authority),
                ("data subjects", d.notify_subjects),
                ("DPDP Board", d.notify_dpdp_board),
            )
            if yes
        ]
        return (
            "decided: notify " + ", ".join(told)
            if told
            else "decided: not notified (reasons recorded, Art. 33(5))"
        )
