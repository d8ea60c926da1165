"""The append-only audit log of one party: :class:`AuditLog`.

Durability contract: :meth:`AuditLog.append` returns only after the entry's
line has been written and ``os.fsync``-ed (and, when the file was created, its
directory too). Perform the recorded action *after* ``append`` returns; if it
raises, do not perform it (fail closed).

Concurrency: every append holds ``fcntl.flock(LOCK_EX)`` on the log file while
it reads the current tail (seq, hash), writes and syncs, so several processes
(or threads) of one party can share a log without interleaving. Each append
re-reads and re-checks the last entry (parse, canonical form, signature), so
it never chains onto a line it did not verify.

Crash safety: a crash mid-append can leave an incomplete last line. Opening
such a log for append raises :class:`PartialTailError`; ``fedmeta audit
verify`` shows it and :meth:`AuditLog.repair_partial_tail` moves the bytes to
a ``.partial`` side file (never deleting them) and appends ``log.repaired``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmeta.audit._fs import fsync_dir, make_dirs, write_all, write_new_file
from fedmeta.audit.entry import (
    FORMAT,
    GENESIS_PREV,
    MAX_LINE_BYTES,
    NO_RUN,
    RESERVED_ACTIONS,
    Entry,
    Scalar,
    UnparsableLineError,
    sha256_hex,
    validate_actor,
)
from fedmeta.audit.errors import (
    AuditError,
    AuditWriteError,
    InvalidEntryError,
    LogStateError,
    PartialTailError,
)
from fedmeta.audit.keys import (
    fingerprint,
    load_or_create_key,
    load_private_key,
    public_pem,
    public_raw_b64,
)
from fedmeta.audit.receipt import Receipt
from fedmeta.audit.verify import scan_log

LOG_FILE_MODE = 0o640
_TAIL_WINDOW = 2 * MAX_LINE_BYTES


def _verify_hint(path: Path) -> str:
    return f"run 'fedmeta audit verify {path}'"


class AuditLog:
    """One party's audit log, open for appending. Create with :meth:`open`."""

    def __init__(self, path: Path, fd: int, key: Ed25519PrivateKey, actor: str) -> None:
        self._path = path
        self._fd: int | None = fd
        self._key = key
        self._pub = key.public_key()
        self._actor = actor
        self._thread_lock = threading.Lock()
        self._failed = False

    # ---- opening ----------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, key_path: Path, actor: str) -> AuditLog:
        """Open (creating on first use) ``path`` for ``actor``, signing with ``key_path``.

        A new log gets a signed ``log.created`` entry holding the public key. An
        existing log must have been created by the same key and actor, and its
        last line must be a complete, valid entry.
        """
        path = Path(path)
        validate_actor(actor)
        key = load_or_create_key(Path(key_path))
        flags = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            make_dirs(path.parent)
            try:
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, LOG_FILE_MODE)
                created = True
            except FileExistsError:
                fd = os.open(path, flags)
                created = False
        except OSError as e:
            raise LogStateError(f"cannot open audit log {path}: {e.strerror or e}") from e
        log = cls(path, fd, key, actor)
        try:
            if created:
                fsync_dir(path.parent)
            with log._locked():
                if os.fstat(fd).st_size == 0:
                    log._write_genesis()
                else:
                    try:
                        log._tail()
                    except PartialTailError:
                        raise
                    except LogStateError:
                        log._check_owner()  # a wrong key/actor is the clearer message
                        raise
                    log._check_owner()
        except BaseException:
            log.close()
            raise
        return log

    @property
    def path(self) -> Path:
        return self._path

    @property
    def actor(self) -> str:
        return self._actor

    def public_key_pem(self) -> bytes:
        """The party's public key (PEM), to give to whoever verifies this log."""
        return public_pem(self._pub)

    def close(self) -> None:
        with self._thread_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- appending --------------------------------------------------------------------
    def append(
        self,
        action: str,
        *,
        run_id: str,
        round: int | None = None,
        decision: str | None = None,
        rule_ids: Sequence[str] = (),
        counts: Mapping[str, int] | None = None,
        model_in: str | None = None,
        model_out: str | None = None,
        epsilon: float | None = None,
        details: Mapping[str, Scalar] | None = None,
    ) -> Entry:
        """Sign and durably append one entry; return it once it is on disk."""
        if not isinstance(action, str) or action.startswith("log.") or action in RESERVED_ACTIONS:
            raise InvalidEntryError(
                f"action {action!r} is reserved: 'log.*' entries are written by the log "
                "itself, use checkpoint() for 'checkpoint'"
            )
        fields = dict(
            run_id=run_id, round=round, decision=decision, rule_ids=rule_ids, counts=counts,
            model_in=model_in, model_out=model_out, epsilon=epsilon, details=details,
        )  # fmt: skip
        with self._locked():
            return self._append_locked(action, **fields)

    def checkpoint(self, run_id: str, round: int | None) -> Receipt:
        """Append a signed ``checkpoint`` closing the current head; return *its* receipt.

        Hand the receipt to a peer (a site reports it to the server, which records it
        in its own log): verifying this log against it later detects truncation,
        rollback or a rewritten history up to that point.
        """
        with self._locked():
            seq, prev = self._tail()
            entry = self._append_locked(
                "checkpoint",
                run_id=run_id,
                round=round,
                details={"head_seq": seq - 1, "head_hash": prev},
            )
        return entry.receipt()

    def head(self) -> Receipt | None:
        """Receipt of the last entry on disk (None only for an empty log)."""
        with self._locked():
            seq, prev = self._tail()
        return Receipt(seq - 1, prev) if seq else None

    # ---- repair -----------------------------------------------------------------------
    @classmethod
    def repair_partial_tail(cls, path: Path, key_path: Path, actor: str) -> Entry:
        """Move an incomplete last line to a side file and record a ``log.repaired`` entry.

        Only the party (its key and actor) may repair its log, and only when the
        incomplete tail is the log's *only* problem; anything else is evidence and is
        left untouched. The side file is ``<log>.partial`` (``.partial.1``, ... if taken).
        Returns the ``log.repaired`` entry; open the log again to continue.
        """
        path = Path(path)
        validate_actor(actor)
        key = load_private_key(Path(key_path))
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise LogStateError(f"cannot open audit log {path}: {e.strerror or e}") from e
        with cls(path, fd, key, actor) as log, log._locked():
            size = os.fstat(fd).st_size
            data = os.pread(fd, size, 0)
            scan = scan_log(data, key.public_key())
            if not scan.partial_tail:
                raise AuditError(f"{path} has no incomplete last line; nothing to repair")
            if scan.problem is not None:
                raise LogStateError(
                    f"{path} has a problem besides its incomplete tail ({scan.problem}); "
                    "not repairing: keep the file as evidence and investigate"
                )
            if scan.actor not in (None, actor):
                raise LogStateError(f"{path} belongs to actor {scan.actor!r}, not {actor!r}")
            tail = data[scan.valid_bytes :]
            side = cls._side_file(path)
            write_new_file(side, tail, LOG_FILE_MODE)
            fsync_dir(path.parent)
            os.ftruncate(fd, scan.valid_bytes)  # the bytes now live in `side`
            os.fsync(fd)
            if scan.valid_bytes == 0:
                log._write_genesis()
            return log._append_locked(
                "log.repaired",
                run_id=NO_RUN,
                details={
                    "partial_file": side.name,
                    "partial_bytes": len(tail),
                    "partial_sha256": sha256_hex(tail),
                },
            )

    @staticmethod
    def _side_file(path: Path) -> Path:
        side = path.with_name(path.name + ".partial")
        n = 0
        while side.exists():
            n += 1
            side = path.with_name(f"{path.name}.partial.{n}")
        return side

    # ---- internals (callers hold the lock) ----------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            if self._fd is None:
                raise AuditError(f"audit log {self._path} is closed")
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _write_genesis(self) -> None:
        self._write(
            Entry.create(
                self._key,
                seq=0,
                prev=GENESIS_PREV,
                actor=self._actor,
                action="log.created",
                run_id=NO_RUN,
                details={"format": FORMAT, "public_key": public_raw_b64(self._pub)},
            )  # fmt: skip
        )

    def _append_locked(self, action: str, **fields: Any) -> Entry:
        if self._failed:
            raise AuditWriteError(
                f"an earlier append to {self._path} failed; reopen the log "
                f"({_verify_hint(self._path)})"
            )
        seq, prev = self._tail()
        entry = Entry.create(
            self._key, seq=seq, prev=prev, actor=self._actor, action=action, **fields
        )
        self._write(entry)
        return entry

    def _write(self, entry: Entry) -> None:
        assert self._fd is not None
        try:
            write_all(self._fd, entry.line_bytes() + b"\n")
            os.fsync(self._fd)
        except OSError as e:
            self._failed = True
            raise AuditWriteError(
                f"could not write audit entry {entry.seq} to {self._path}: {e.strerror or e}; "
                "the action it records must not be performed"
            ) from e

    def _tail(self) -> tuple[int, str]:
        """(next seq, hash of the last entry) after checking the last line on disk."""
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        if size == 0:
            return 0, GENESIS_PREV
        start = max(0, size - _TAIL_WINDOW)
        data = os.pread(self._fd, size - start, start)
        if not data.endswith(b"\n"):
            raise PartialTailError(
                f"{self._path} ends with an incomplete line (probably a crash during an "
                f"append); refusing to append after it. {_verify_hint(self._path).capitalize()}, "
                f"then 'fedmeta audit repair {self._path} --key KEY' to move the partial bytes "
                "to a .partial file"
            )
        cut = data.rfind(b"\n", 0, len(data) - 1)
        if cut < 0 and start > 0:
            raise LogStateError(f"{self._path}: last line is too long; {_verify_hint(self._path)}")
        try:
            entry = Entry.from_line(data[cut + 1 : -1])
        except UnparsableLineError as e:
            if data[cut + 1 : -1].strip(b"\x00"):  # a complete line that does not parse
                raise LogStateError(
                    f"{self._path}: the last line was edited, it is not a JSON entry ({e}); "
                    f"{_verify_hint(self._path)}"
                ) from e
            raise PartialTailError(
                f"{self._path}: the last line is not a JSON entry ({e}), probably a crash "
                f"during an append; {_verify_hint(self._path)}, then 'fedmeta audit repair'"
            ) from e
        except InvalidEntryError as e:
            raise LogStateError(
                f"{self._path}: the last entry is invalid ({e}); {_verify_hint(self._path)}"
            ) from e
        if entry.actor != self._actor or not entry.verify_signature(self._pub):
            raise LogStateError(
                f"{self._path}: the last entry (seq {entry.seq}) was not signed by this party "
                f"({self._actor}, key {fingerprint(self._pub)}); {_verify_hint(self._path)}"
            )
        return entry.seq + 1, entry.hash

    def _check_owner(self) -> None:
        """The first entry must be this party's ``log.created`` with this key."""
        assert self._fd is not None
        head = os.pread(self._fd, MAX_LINE_BYTES, 0)
        try:
            first = Entry.from_line(head.split(b"\n", 1)[0])
        except InvalidEntryError as e:
            raise LogStateError(
                f"{self._path}: first entry is invalid ({e}); {_verify_hint(self._path)}"
            ) from e
        if first.seq != 0 or first.action != "log.created":
            raise LogStateError(
                f"{self._path}: does not start with 'log.created'; {_verify_hint(self._path)}"
            )
        if first.details.get("public_key") != public_raw_b64(self._pub):
            raise LogStateError(
                f"{self._path} was created with another key than {fingerprint(self._pub)}; "
                "open it with the key that created it"
            )
        if first.actor != self._actor:
            raise LogStateError(
                f"{self._path} is the log of {first.actor!r}, not of {self._actor!r}"
            )
