"""Helpers for the audit-log tests: build real logs with real keys, forge entries."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmeta.audit import AuditLog, Entry, Receipt
from fedmeta.audit.entry import GENESIS_PREV


@dataclass
class LogFixture:
    path: Path
    key_path: Path
    actor: str
    receipts: list[Receipt] = field(default_factory=list)

    @property
    def pub_path(self) -> Path:
        return self.key_path.with_name(self.key_path.stem + ".pub.pem")

    def lines(self) -> list[bytes]:
        """The stored lines, each with its trailing newline."""
        return self.path.read_bytes().splitlines(keepends=True)

    def write_lines(self, lines: list[bytes]) -> None:
        self.path.write_bytes(b"".join(lines))

    def entries(self) -> list[Entry]:
        return [Entry.from_line(line.rstrip(b"\n")) for line in self.lines()]


def fill_log(log: AuditLog, n: int, run_id: str = "run-1") -> list[Receipt]:
    """Append n varied entries (decisions, counts, hashes, epsilon, details)."""
    out = []
    for i in range(n):
        e = log.append(
            ("round.train", "policy.decision", "run.start")[i % 3],
            run_id=run_id,
            round=i,
            decision=("allow", "allow-with-exclusions", "deny", None)[i % 4],
            rule_ids=["G01", "DPDP-R16"][: i % 3],
            counts={"excluded.consent": i, "used": 10 * i},
            model_in=f"{i:064x}",
            model_out=None if i % 2 else f"{i + 1:064x}",
            epsilon=0.125 * i if i % 2 else None,
            details={"note": f"step {i} é", "ok": bool(i % 2), "lr": 0.01, "k": i},
        )
        out.append(e.receipt())
    return out


def forge(entries: list[Entry], key: Ed25519PrivateKey, start: int) -> list[bytes]:
    """Re-sign and re-chain entries[start:] with `key`, as a forger holding another key would."""
    prev = entries[start - 1].hash if start else GENESIS_PREV
    out = []
    for i, e in enumerate(entries[start:], start):
        f = Entry.create(
            key, seq=i, prev=prev, actor=e.actor, action=e.action, run_id=e.run_id,
            round=e.round, decision=e.decision, rule_ids=e.rule_ids, counts=e.counts,
            model_in=e.model_in, model_out=e.model_out, epsilon=e.epsilon,
            details=e.details, time=e.time,
        )  # fmt: skip
        out.append(f.line_bytes() + b"\n")
        prev = f.hash
    return out
