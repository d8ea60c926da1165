"""The legal clocks of an incident, side by side: GDPR Art. 33(1) (authority, 72 hours),
Art. 34(1) (data subjects, without undue delay where the risk is high), DPDP Rules r.7
(Board and each affected Data Principal without delay; the Board's detailed report
within 72 hours, r.7(2)(b)). Each clock says whether its provision is in force on the
date asked (DPDP Rules r.7 applies from 13 May 2027)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from fedmeta.incidents.model import Incident
from policies import legal_status

HOURS_72 = timedelta(hours=72)


@dataclass(frozen=True)
class Clock:
    law: str
    reference: str
    duty: str
    deadline: datetime | None
    """None: "without (undue) delay", no fixed hour."""
    in_force: str
    """binding / readiness (applies from ...) on the date asked."""

    def state(self, now: datetime, done: bool) -> str:
        if done:
            return "decided"
        if self.deadline is None:
            return "due without delay"
        left = self.deadline - now
        if left.total_seconds() < 0:
            return f"OVERDUE by {_hours(-left)}"
        return f"{_hours(left)} left"


def _hours(delta: timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours:.0f} h" if hours >= 1 else f"{delta.total_seconds() / 60:.0f} min"


def clocks(incident: Incident, on: datetime) -> list[Clock]:
    """The clocks that run for ``incident`` (DPDP ones only where a DPDP site is concerned)."""
    aware = incident.aware_at
    day = on.date()
    out = [
        Clock(
            "GDPR",
            "GDPR Art. 33(1)",
            "notify the supervisory authority, where feasible "
            "within 72 hours of awareness, unless unlikely to result in a risk",
            aware + HOURS_72,
            legal_status(("GDPR Art. 33(1)",), day).describe(),
        ),
        Clock(
            "GDPR",
            "GDPR Art. 34(1)",
            "tell the data subjects without undue delay where "
            "the breach is likely to result in a high risk to them",
            None,
            legal_status(("GDPR Art. 34(1)",), day).describe(),
        ),
    ]
    if incident.dpdp:
        out += [
            Clock(
                "DPDP",
                "DPDP Rules 2025 r.7(1)",
                "intimate the Board and each affected Data Principal without delay",
                None,
                legal_status(("DPDP Rules 2025 r.7(1)",), day).describe(),
            ),
            Clock(
                "DPDP",
                "DPDP Rules 2025 r.7(2)(b)",
                "detailed report to the Board within 72 hours of becoming aware",
                aware + HOURS_72,
                legal_status(("DPDP Rules 2025 r.7(2)(b)",), day).describe(),
            ),
        ]
    return out
