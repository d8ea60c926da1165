"""Where a run's incidents live: ``RUN/incidents/incidents.json`` (the current records)
and ``RUN/incidents/audit-log.jsonl`` (every opening and decision, hash-chained and
signed with ``incident-signing.pem`` beside it, like the parties' logs)."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from fedmeta.audit import AuditLog
from fedmeta.incidents.model import Decision, Incident
from fedmeta.paths import INCIDENTS_DIR as DIR
from fedmeta.paths import INCIDENTS_FILE as FILE
from fedmeta.paths import INCIDENTS_KEY as KEY
from fedmeta.paths import INCIDENTS_LOG as LOG
from policies.validation import format_validation_error

_LIST = TypeAdapter(list[Incident])


class IncidentError(ValueError):
    """An unreadable incident file or an unknown incident (one line)."""


class IncidentStore:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / DIR
        self.path = self.dir / FILE

    def load(self) -> list[Incident]:
        if not self.path.is_file():
            return []
        try:
            return _LIST.validate_json(self.path.read_bytes())
        except ValidationError as exc:
            raise IncidentError(
                f"{self.path}: not a valid incident file "
                f"({format_validation_error(exc, '')}): restore it from the audit "
                "log or a backup"
            ) from None

    def _save(self, incidents: list[Incident]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(_LIST.dump_json(incidents, indent=2) + b"\n")
        os.replace(tmp, self.path)

    def _log(self) -> AuditLog:
        self.dir.mkdir(parents=True, exist_ok=True)
        return AuditLog.open(self.dir / LOG, self.dir / KEY, actor="incidents")

    def get(self, incident_id: str) -> Incident:
        for i in self.load():
            if i.id == incident_id:
                return i
        raise IncidentError(
            f"no incident {incident_id!r} in {self.path}: see `fedmeta incident list`"
        )

    def open_new(self, found: list[Incident]) -> list[Incident]:
        """Record the incidents in ``found`` not seen before (same id); audit each, durably,
        before it is written to the incident file. Returns the new ones."""
        known = self.load()
        ids = {i.id for i in known}
        new = [i for i in found if i.id not in ids]
        if not new:
            return []
        log = self._log()
        for i in new:
            log.append(
                "incident.open",
                run_id=i.run_id,
                details={
                    "incident": i.id,
                    "kind": i.kind,
                    "site": i.site_id,
                    "aware_at": i.aware_at.isoformat(),
                    "summary": i.summary[:500],
                    "source": i.source[:300],
                },
            )
        self._save(known + new)
        return new

    def decide(self, incident_id: str, decision: Decision) -> Incident:
        known = self.load()
        target = self.get(incident_id)
        if target.decision is not None:
            raise IncidentError(
                f"{incident_id} was decided on "
                f"{target.decision.decided_at.isoformat()}: a decision is "
                "not overwritten; open a review in the audit trail instead"
            )
        updated = target.model_copy(update={"decision": decision})
        self._log().append(
            "incident.decide",
            run_id=target.run_id,
            details={
                "outcome": "notify"
                if decision.notify_authority
                or decision.notify_subjects
                or decision.notify_dpdp_board
                else "do-not-notify",
                "incident": incident_id,
                "notify_authority": decision.notify_authority,
                "notify_subjects": decision.notify_subjects,
                "notify_dpdp_board": decision.notify_dpdp_board,
                "reasons": decision.reasons[:1000],
                "decided_by": decision.decided_by,
                "decided_at": decision.decided_at.isoformat(),
            },
        )
        self._save([updated if i.id == incident_id else i for i in known])
        return updated


def now() -> datetime:
    return datetime.now(UTC)


def dumps(incident: Incident) -> str:
    return json.dumps(incident.model_dump(mode="json"), indent=2)
