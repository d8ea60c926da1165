"""The server's audit of a round: its stop, its start (sent, signed, to the sites), the
sites' receipts and its end, closed with a signed checkpoint whose head the next round
sends to the sites."""

from __future__ import annotations

from flwr.app import ArrayRecord

from fedmeta.audit import AuditLog
from fedmeta.deploy.serverkey import entry_line
from server.strategy.roundlog import RoundLog, digest, outcome_details


class RoundObserver:
    """Writes a strategy's round entries to the server's audit log (none without one)."""

    def __init__(self, audit: AuditLog | None = None, run_id: str = "-") -> None:
        self.audit, self.run_id = audit, run_id
        self.server_head = ""

    def run_stopped(self, server_round: int, reason: str) -> None:
        if self.audit:
            self.audit.append(
                "run.stop",
                run_id=self.run_id,
                round=server_round,
                decision="deny",
                rule_ids=["PRIV-MIN-SITES"],
                details={"reason": reason[:500]},
            )

    def round_started(
        self, server_round: int, arrays: ArrayRecord, log_: RoundLog, sampled: int
    ) -> str | None:
        """The signed ``round.start`` entry's line (durable before the messages leave),
        or None without a log."""
        if not self.audit:
            return None
        started = self.audit.append(
            "round.start",
            run_id=self.run_id,
            round=server_round,
            decision="allow",
            model_out=digest(arrays),
            counts={"sampled": sampled},
            details={"sites": ",".join(log_.sampled)[:500], "beta": log_.beta},
        )
        return entry_line(started)

    def round_ended(
        self,
        server_round: int,
        log_: RoundLog,
        theta: ArrayRecord | None,
        arrays: ArrayRecord | None,
    ) -> None:
        """The sites' receipts, ``round.end`` and the round's signed checkpoint."""
        if not self.audit:
            return
        for site, receipt in sorted(log_.receipts.items()):
            self.audit.append(
                "round.receipt",
                run_id=self.run_id,
                round=server_round,
                details={"site": site, "receipt": receipt},
            )
        self.audit.append(
            "round.end",
            run_id=self.run_id,
            round=server_round,
            decision="allow" if arrays is not None else "deny",
            model_in=digest(theta) if theta else None,
            model_out=digest(arrays) if arrays is not None else None,
            counts={
                "used": len(log_.used),
                "declined": len(log_.declined),
                "dropped": len(log_.dropped),
                "lost": len(log_.lost),
                "examples": log_.examples,
            },
            details=outcome_details(log_),
        )
        self.server_head = str(self.audit.checkpoint(self.run_id, server_round))
