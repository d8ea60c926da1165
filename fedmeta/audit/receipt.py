"""Receipts: a compact ``SEQ:HASH`` reference to one entry of an audit log.

A party hands a receipt of its log head (usually the one returned by
:meth:`AuditLog.checkpoint`) to a peer, which keeps it (the server records the
sites' receipts in its own log). Verifying the party's log later against the
receipt detects truncation, rollback or a rewritten history: the entry at
``SEQ`` must exist and its hash must be ``HASH``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedmeta.audit.errors import ReceiptFormatError

_HASH_RE = re.compile(r"[0-9a-f]{64}")
_RECEIPT_RE = re.compile(r"(0|[1-9][0-9]{0,18}):([0-9a-fA-F]{64})")


@dataclass(frozen=True, slots=True)
class Receipt:
    """Entry ``seq`` of a log has hash ``hash`` (lowercase hex sha256, see ``entry.py``)."""

    seq: int
    hash: str

    def __post_init__(self) -> None:
        if isinstance(self.seq, bool) or not isinstance(self.seq, int) or self.seq < 0:
            raise ReceiptFormatError(f"receipt seq must be an int >= 0, got {self.seq!r}")
        if not isinstance(self.hash, str) or not _HASH_RE.fullmatch(self.hash):
            raise ReceiptFormatError(
                f"receipt hash must be 64 lowercase hex digits (sha256), got {self.hash!r}"
            )

    def __str__(self) -> str:
        return f"{self.seq}:{self.hash}"

    @classmethod
    def parse(cls, text: str) -> Receipt:
        """Parse ``"SEQ:HASH"`` (surrounding whitespace allowed; hex digits in either case)."""
        if not isinstance(text, str):
            raise ReceiptFormatError(
                f"receipt must be a string 'SEQ:HASH', got {type(text).__name__}"
            )
        m = _RECEIPT_RE.fullmatch(text.strip())
        if m is None:
            shown = text if len(text) <= 80 else text[:77] + "..."
            raise ReceiptFormatError(
                f"bad receipt {shown!r}: expected 'SEQ:HASH' with SEQ a non-negative integer "
                "and HASH 64 hex digits, e.g. '12:9f86d081884c7d65...'"
            )
        return cls(int(m.group(1)), m.group(2).lower())
