"""Verify an audit log: chain, signatures, canonical bytes, tail and receipts.

:func:`verify_log` never raises for a tampered or damaged log; it reports the
*first* problem in a :class:`VerifyResult`. It raises :class:`AuditReadError` /
:class:`KeyFileError` only when the log or the given public key cannot be read.

What is checked, line by line (line ``n`` must hold entry ``seq == n``):

1. the line is a JSON object whose canonical serialisation equals the stored
   bytes exactly, with valid field types and sizes (any edited byte);
2. ``seq == n`` (a deleted, inserted or reordered entry);
3. ``prev`` equals the hash of line ``n - 1`` (64 zeros for line 0);
4. line 0 is ``log.created`` and carries the party's public key; if the
   caller pins a key (``public_key``) it must be that key, otherwise the
   embedded key is trusted on first use (``key_source == "embedded"``);
5. every entry has the log's actor and an Ed25519 signature valid under the key
   (entries re-signed by another key); ``checkpoint`` entries name their head.

A valid *prefix* of a log is itself a valid log, so truncation or rollback is
only visible against something kept elsewhere: a receipt ``SEQ:HASH`` (e.g.
the one :meth:`AuditLog.checkpoint` returned and a peer recorded) fails when
``SEQ`` is beyond the end or the entry there has another hash.

Incomplete tail. If the last line is *torn* (a crash in the middle of an append:
a prefix of a canonical entry without its newline, a valid entry missing only its
newline, or zero fill), the complete entries before it are still verified and
counted; the result then has ``partial_tail=True``
and ``ok=False`` with a problem saying so. ``ok`` is False because the bytes
are not a valid log until someone acknowledges them: ``fedmeta audit repair``
(:meth:`AuditLog.repair_partial_tail`) moves them to a ``.partial`` side file
and records a signed ``log.repaired`` entry, after which the log verifies. A last
line that was *edited* (it has its newline but does not parse, or it is not the
start of an entry) is an ordinary bad entry: ``partial_tail`` stays False and
``repair`` refuses to touch it.

Input. Only a regular file is read (a FIFO or device is refused without
blocking), line by line; a line longer than the longest possible entry stops the
reading there, so no input can make the verifier hang or exhaust memory.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedmeta.audit.entry import (
    FORMAT,
    GENESIS_PREV,
    MAX_LINE_BYTES,
    Entry,
    UnparsableLineError,
    parse_json_object,
    sha256_hex,
)
from fedmeta.audit.errors import AuditReadError, InvalidEntryError, KeyFileError
from fedmeta.audit.keys import fingerprint, load_public_key, public_key_from_raw_b64, public_raw_b64
from fedmeta.audit.receipt import Receipt

KEY_GIVEN = "given"
KEY_EMBEDDED = "embedded"


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify_log`. ``problem`` is one line naming the first bad entry."""

    path: str
    ok: bool
    entries: int  # complete, valid entries before the first problem
    head: Receipt | None  # receipt of the last of those entries
    first_bad_seq: int | None  # line position (= expected seq) of the first problem
    problem: str | None
    partial_tail: bool
    receipts_checked: list[tuple[Receipt, bool]] = field(default_factory=list)
    key_source: str = KEY_EMBEDDED  # "given" (pinned by the caller) or "embedded" (TOFU)
    key_fingerprint: str | None = None
    actor: str | None = None
    last_checkpoint: Receipt | None = None

    def summary(self) -> str:
        """One human line: verdict, counts, head, key and receipts."""
        key = (
            f"key {self.key_fingerprint} given"
            if self.key_source == KEY_GIVEN
            else f"key {self.key_fingerprint} embedded in the log (trust on first use)"
        )
        n_ok = sum(1 for _, good in self.receipts_checked if good)
        receipts = (
            f", {n_ok}/{len(self.receipts_checked)} receipts match" if self.receipts_checked else ""
        )
        head = f"head {self.head}" if self.head else "no valid entry"
        if self.ok:
            return f"OK {self.path}: {self.entries} entries, {head}, {key}{receipts}"
        return (
            f"BAD {self.path}: {self.problem} [{self.entries} valid "
            f"{'entry' if self.entries == 1 else 'entries'} before it, "
            f"{head}, {key}{receipts}]"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (receipts as ``SEQ:HASH`` strings)."""
        return {
            "path": self.path,
            "ok": self.ok,
            "entries": self.entries,
            "head": str(self.head) if self.head else None,
            "first_bad_seq": self.first_bad_seq,
            "problem": self.problem,
            "partial_tail": self.partial_tail,
            "receipts_checked": [[str(r), good] for r, good in self.receipts_checked],
            "key_source": self.key_source,
            "key_fingerprint": self.key_fingerprint,
            "actor": self.actor,
            "last_checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
        }


@dataclass
class Scan:
    """What :func:`scan_log` found (also used by :meth:`AuditLog.repair_partial_tail`)."""

    entries: list[Entry] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    valid_bytes: int = 0  # length of the prefix made of the valid entries
    first_bad_seq: int | None = None
    problem: str | None = None
    partial_tail: bool = False
    partial_problem: str | None = None
    complete_lines: int = 0
    key: Ed25519PublicKey | None = None
    actor: str | None = None
    last_checkpoint: Receipt | None = None


def _where(i: int) -> str:
    return f"entry {i} (line {i + 1})"


def _check_first(
    e: Entry, pinned: Ed25519PublicKey | None
) -> tuple[Ed25519PublicKey | None, str | None]:
    if e.action != "log.created":
        return None, f"first entry has action {e.action!r}, expected 'log.created'"
    if e.details.get("format") != FORMAT:
        return None, f"unsupported log format {e.details.get('format')!r} (expected {FORMAT!r})"
    raw = e.details.get("public_key")
    try:
        embedded = public_key_from_raw_b64(raw if isinstance(raw, str) else "")
    except KeyFileError:
        return None, "log.created does not hold a valid Ed25519 public key"
    if pinned is not None and public_raw_b64(pinned) != public_raw_b64(embedded):
        return None, (
            f"the log was created with key {fingerprint(embedded)}, not the given key "
            f"{fingerprint(pinned)} (log re-created or re-signed by another key)"
        )
    return (pinned or embedded), None


def _check_entry(
    i: int, e: Entry, prev: str, scan: Scan, pinned: Ed25519PublicKey | None
) -> str | None:
    if e.seq != i:
        return f"has seq {e.seq}, expected {i} (an entry was deleted, inserted or reordered)"
    if e.prev != prev:
        return (
            "prev does not match the hash of the entry before it "
            "(an earlier entry was changed, deleted, inserted or reordered)"
        )
    if i == 0:
        scan.key, problem = _check_first(e, pinned)
        if problem:
            return problem
        scan.actor = e.actor
    elif e.action == "log.created":
        return "'log.created' may only be the first entry"
    elif e.actor != scan.actor:
        return f"actor {e.actor!r} differs from the log's actor {scan.actor!r}"
    if e.action == "checkpoint" and dict(e.details) != {"head_seq": i - 1, "head_hash": e.prev}:
        return "checkpoint details do not name the entry it closes (head_seq, head_hash)"
    assert scan.key is not None
    if not e.verify_signature(scan.key):
        return (
            "signature does not verify under the party's key "
            "(entry changed or signed by another key)"
        )
    return None


_CANONICAL_START = b'{"action":"'


def is_torn(tail: bytes) -> bool:
    """Whether ``tail`` (a last line, newline excluded) looks like an interrupted append.

    An append writes one canonical line, which always starts with ``{"action":"``; a crash
    leaves a *prefix* of it, possibly followed by zero bytes (a block the file system
    allocated but never filled). Anything else in the last line (a complete-looking line
    that no longer parses, bytes that are not the start of an entry) was edited, not torn.
    """
    body = tail.rstrip(b"\x00")
    if not body:
        return bool(tail)
    if b"\x00" in body or b"\n" in body:
        return False
    n = min(len(body), len(_CANONICAL_START))
    if body[:n] != _CANONICAL_START[:n]:
        return False
    try:
        parse_json_object(body)
    except UnparsableLineError:
        return True  # an unfinished JSON object: the end of the line was never written
    return False  # complete JSON: checked as an entry (see scan_log)


def scan_log(data: bytes, pinned: Ed25519PublicKey | None = None) -> Scan:
    """Check the bytes of a log; stop at the first bad complete line.

    The last line counts as *torn* (``partial_tail``; repairable) only when
    :func:`is_torn` says it is an interrupted append: a prefix of a canonical entry
    without its newline, or zero fill. A last line that was edited (it ends with its
    newline but no longer parses, or it is not the start of an entry) is a problem like
    any other bad entry, never a crash to repair.
    """
    scan = Scan()
    missing_newline = False
    lines = data.split(b"\n")
    tail = lines.pop()  # bytes after the last newline; b"" when the file ends with one
    if tail and is_torn(tail):
        scan.partial_tail = True
        scan.partial_problem = (
            f"incomplete last line ({len(tail)} bytes without a trailing newline), "
            "e.g. a crash during an append"
        )
    elif tail:
        lines.append(tail)  # checked like any line: an edited (or complete) last line
        missing_newline = True
    elif lines and lines[-1] and not lines[-1].strip(b"\x00"):
        lines.pop()
        scan.partial_tail = True
        scan.partial_problem = "zero-filled last line, e.g. a crash during an append"
    scan.complete_lines = len(lines)
    prev = GENESIS_PREV
    for i, line in enumerate(lines):
        try:
            e = Entry.from_line(line)
        except InvalidEntryError as ex:
            scan.first_bad_seq, scan.problem = i, f"{_where(i)}: {ex}"
            return scan
        problem = _check_entry(i, e, prev, scan, pinned)
        if problem:
            scan.first_bad_seq, scan.problem = i, f"{_where(i)}: {problem}"
            return scan
        prev = sha256_hex(line)  # == e.hash, the line being canonical
        scan.entries.append(e)
        scan.hashes.append(prev)
        scan.valid_bytes += len(line) + 1
        if e.action == "checkpoint":
            scan.last_checkpoint = Receipt(i, prev)
    if missing_newline:  # a valid last entry whose newline was never written: torn
        scan.partial_tail = True
        scan.partial_problem = "the last entry lacks its newline, e.g. a crash during an append"
        scan.complete_lines -= 1
        scan.entries.pop()
        scan.hashes.pop()
        scan.valid_bytes -= len(lines[-1]) + 1
        if scan.entries and scan.entries[-1].action == "checkpoint":
            scan.last_checkpoint = Receipt(len(scan.entries) - 1, scan.hashes[-1])
        elif scan.last_checkpoint is not None and scan.last_checkpoint.seq >= len(scan.entries):
            scan.last_checkpoint = None
    return scan


def _check_receipts(
    scan: Scan, receipts: Sequence[Receipt]
) -> tuple[list[tuple[Receipt, bool]], list[tuple[int, int, str]]]:
    checked: list[tuple[Receipt, bool]] = []
    problems: list[tuple[int, int, str]] = []
    n = len(scan.hashes)
    last = f"entry {n - 1}" if n else "no valid entry"
    for r in receipts:
        if r.seq < n:
            good = scan.hashes[r.seq] == r.hash
            if not good:
                problems.append((r.seq, 1, (
                    f"{_where(r.seq)}: hash {scan.hashes[r.seq][:16]}... does not match receipt "
                    f"{r} (the log was rewritten after the receipt was issued)"
                )))  # fmt: skip
        else:
            good = False
            if scan.problem is None:
                problems.append((n, 1, (
                    f"receipt {r} names entry {r.seq} but the log ends at {last} "
                    "(truncated or rolled back)"
                )))  # fmt: skip
        checked.append((r, good))
    return checked, problems


def read_log_bytes(path: Path) -> tuple[bytes, int | None]:
    """The bytes of a log file, refusing anything but a regular file.

    Reads line by line and stops at the first line longer than the longest entry
    (:data:`MAX_LINE_BYTES`): returns (the complete lines before it, its index), so a
    huge or endless file is never held in memory. A FIFO, device or directory raises
    :class:`AuditReadError` without blocking (the file is opened non-blocking).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise AuditReadError(f"cannot read audit log {path}: {e.strerror or e}") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise AuditReadError(
                f"{path}: not a regular file (a FIFO, device or directory); "
                "give the path of the log file itself"
            )
        os.set_blocking(fd, True)
        parts: list[bytes] = []
        with os.fdopen(fd, "rb", closefd=False) as fh:
            for index, line in enumerate(iter(lambda: fh.readline(MAX_LINE_BYTES + 1), b"")):
                if len(line) > MAX_LINE_BYTES:
                    return b"".join(parts), index
                parts.append(line)
    except OSError as e:
        raise AuditReadError(f"cannot read audit log {path}: {e.strerror or e}") from e
    finally:
        os.close(fd)
    return b"".join(parts), None


def read_log(
    path: Path, public_key: Path | bytes | None = None, receipts: Sequence[Receipt] = ()
) -> tuple[list[Entry], VerifyResult]:
    """The verified entries of a log (the valid prefix) and its :class:`VerifyResult`."""
    path = Path(path)
    data, overlong = read_log_bytes(path)
    pinned = None if public_key is None else load_public_key(public_key)
    receipts = [r if isinstance(r, Receipt) else Receipt.parse(r) for r in receipts]
    scan = scan_log(data, pinned)
    candidates: list[tuple[int, int, str]] = []
    if overlong is not None and scan.problem is None:
        scan.partial_tail = False
        scan.first_bad_seq = overlong
        scan.problem = (
            f"{_where(overlong)}: longer than {MAX_LINE_BYTES} bytes, not an audit "
            "entry (reading stopped there)"
        )
    if scan.problem is not None and scan.first_bad_seq is not None:
        candidates.append((scan.first_bad_seq, 0, scan.problem))
    elif not data:
        candidates.append((0, 0, "the log is empty (no 'log.created' entry)"))
    if scan.partial_tail and scan.partial_problem:
        pos = scan.complete_lines
        candidates.append(
            (pos, 2, f"line {pos + 1}: {scan.partial_problem}; run 'fedmeta audit repair'")
        )
    checked, receipt_problems = _check_receipts(scan, receipts)
    candidates += receipt_problems
    first = min(candidates) if candidates else None
    key = scan.key or pinned
    n = len(scan.entries)
    result = VerifyResult(
        path=str(path),
        ok=first is None,
        entries=n,
        head=Receipt(n - 1, scan.hashes[-1]) if n else None,
        first_bad_seq=first[0] if first else None,
        problem=first[2] if first else None,
        partial_tail=scan.partial_tail,
        receipts_checked=checked,
        key_source=KEY_GIVEN if pinned is not None else KEY_EMBEDDED,
        key_fingerprint=fingerprint(key) if key is not None else None,
        actor=scan.actor,
        last_checkpoint=scan.last_checkpoint,
    )
    return scan.entries, result


def verify_log(
    path: Path, public_key: Path | bytes | None = None, receipts: Sequence[Receipt] = ()
) -> VerifyResult:
    """Verify the audit log at ``path``; see the module docstring for what is checked."""
    return read_log(path, public_key, receipts)[1]
