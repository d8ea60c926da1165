"""Incidents with legal clocks: signals fedmeta already produces (a log that fails
verification, a receipt or model-hash mismatch, an epsilon overspend, an unknown node,
insecure transport, an update rejected by the norm bound) open an incident with the time
the controller became aware of it; GDPR Art. 33 / 34 and DPDP Rules r.7 clocks run from
that time, and the notify / do-not-notify decision is recorded with its reasons
(Art. 33(5)). Every opening and decision is appended to a signed audit log.

``fedmeta incident scan|list|show|decide RUN_DIR`` (:mod:`fedmeta.incidents.cli`).
"""

from fedmeta.incidents.clocks import Clock, clocks
from fedmeta.incidents.model import Decision, Incident
from fedmeta.incidents.store import IncidentStore

__all__ = ["Clock", "Decision", "Incident", "IncidentStore", "clocks"]
