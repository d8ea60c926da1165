"""Tamper-evident audit log: append-only, hash-chained, Ed25519-signed JSON Lines.

Each party (the server, each site) keeps one log and one signing key::

    from fedmeta.audit import AuditLog, verify_log

    log = AuditLog.open(run_dir / "audit" / "site-3.jsonl", keys_dir / "site-3.pem", "site-3")
    log.append("round.train", run_id=run_id, round=3, decision="allow",
               counts={"excluded.consent": 4}, model_in=h_in, model_out=h_out, epsilon=0.42)
    receipt = log.checkpoint(run_id, 3)            # "SEQ:HASH", handed to a peer
    result = verify_log(log.path, public_key=pub_pem, receipts=[receipt])

* The file format and the canonical serialisation: ``fedmeta/audit/entry.py``.
* Durability, locking and crash repair: ``log.py``. Verification: ``verify.py``.
* Keys: ``keys.py``. Command line (``fedmeta audit ...``, ``fedmeta keys ...``): ``cli.py``.
"""

from fedmeta.audit.entry import Entry
from fedmeta.audit.errors import (
    AuditError,
    AuditReadError,
    AuditWriteError,
    InvalidEntryError,
    KeyFileError,
    LogStateError,
    PartialTailError,
    ReceiptFormatError,
)
from fedmeta.audit.log import AuditLog
from fedmeta.audit.receipt import Receipt
from fedmeta.audit.verify import VerifyResult, read_log, verify_log

__all__ = [
    "AuditError",
    "AuditLog",
    "AuditReadError",
    "AuditWriteError",
    "Entry",
    "InvalidEntryError",
    "KeyFileError",
    "LogStateError",
    "PartialTailError",
    "Receipt",
    "ReceiptFormatError",
    "VerifyResult",
    "read_log",
    "verify_log",
]
