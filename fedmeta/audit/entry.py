"""One audit entry and THE canonical serialisation: the audit-log format, in one place.

File
----
A party (the server, or one site) keeps one log: a UTF-8 JSON Lines file,
append-only. Line ``n`` (0-based) holds the entry with ``seq == n``; every
line, including the last, ends with ``\\n``. Nothing else is in the file.

Entry fields (all present in every entry, ``null`` where not applicable)
------------------------------------------------------------------------
``seq``        int >= 0, position in the log.
``time``       UTC time of the append, ``YYYY-MM-DDTHH:MM:SS.ffffffZ``.
``actor``      pseudonymous party id (``server``, ``site-3``): 1-64 of ``[A-Za-z0-9._-]``,
               starting with a letter or digit. The same in every entry of a log.
``action``     dotted lower-case name (``run.start``, ``round.train``,
               ``policy.decision``, ``checkpoint``), at most 64 chars. The
               ``log.*`` names and ``checkpoint`` are written by the log itself.
``run_id``     1-128 of ``[A-Za-z0-9._:+-]``; ``-`` for entries not tied to a run.
``round``      int >= 0, or null.
``decision``   ``allow`` | ``allow-with-exclusions`` | ``deny``, or null.
``rule_ids``   list of rule ids (at most 64, each 1-64 of ``[A-Za-z0-9_.:/()+-]``).
``counts``     object name -> int >= 0 (at most 64), e.g. records excluded per rule.
``model_in``   lowercase hex sha256 of the model received, or null.
``model_out``  lowercase hex sha256 of the model sent, or null.
``epsilon``    finite float >= 0 (privacy budget spent), or null.
``details``    object name -> scalar (string <= 512 chars without control
               characters, int, finite float, bool, null); at most 32 keys and
               4096 bytes serialised. Never raw data or direct identifiers: the
               schema has no free-form payload on purpose.
``prev``       ``hash`` of the previous entry; 64 zeros for ``seq`` 0.
``sig``        Ed25519 signature (standard base64 with padding, 88 chars) of the
               entry's *body bytes*, by the party's key.

Canonical serialisation
-----------------------
``canonical(obj) = json.dumps(obj, sort_keys=True, separators=(",", ":"),
ensure_ascii=False, allow_nan=False).encode("utf-8")`` (floats as Python's
shortest round-trip ``repr``).

* body bytes  = ``canonical(entry without "sig")``      -- what ``sig`` signs;
* line bytes  = ``canonical(entry with "sig")``         -- the stored line, minus ``\\n``;
* ``hash``    = ``sha256(line bytes)``, lowercase hex   -- never stored, always recomputed;
  the next entry's ``prev`` and receipts (``SEQ:HASH``) refer to it.

A verifier parses each line, re-serialises it canonically and requires the
result to equal the stored bytes exactly, so *any* change to a line (even
whitespace, key order, number spelling or a base64 padding bit) is detected,
not only changes that alter the parsed values.

Exactly, for a verifier in another language:

* keys in ascending order of their UTF-8 bytes (all keys are ASCII), at every level;
* no whitespace anywhere: ``,`` between members, ``:`` between key and value;
* strings: UTF-8, not ``\\u``-escaped except ``"`` -> ``\\"``, ``\\`` -> ``\\\\`` (control
  characters never occur: they are refused in every string);
* integers in decimal, ``-`` for a negative one, no ``+`` or leading zeros;
* floats as Python's ``repr``: the shortest decimal that reads back as the same
  IEEE-754 double; positional with at least one digit after the point (``0.5``,
  ``1.0``, ``1.582410624684387``) when the decimal exponent is in [-4, 16), else
  ``d.ddde±XX`` with a signed exponent of at least two digits (``1e-05``,
  ``1e+16``); never ``NaN``/``Infinity``; ``epsilon`` is always a float (``1.0``);
* ``true``, ``false``, ``null`` for booleans and absent values.

The signature is Ed25519 (RFC 8032, pure, no pre-hash) over the body bytes; the
public key is the raw 32 bytes base64-encoded in ``log.created`` (and, as PEM
SubjectPublicKeyInfo, in the party's ``.pub.pem`` file). Its fingerprint is
``sha256:`` + the lowercase hex SHA-256 of those 32 raw bytes.

Test vector (``tests/audit/test_audit_vector.py`` checks it, and verifies it with
``openssl pkeyutl -verify -rawin`` where openssl is installed). Private key seed
(32 bytes, hex) ``000102...1f`` (the bytes 0 to 31); public key (raw, base64)
``A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=``. Body bytes (one line, no newline)::

    {"action":"round.train","actor":"site-3","counts":{"examples":200},"decision":"allow",
    "details":{"dp":true,"noise_multiplier":1.1},"epsilon":0.5,"model_in":"cdcd...cd",
    "model_out":null,"prev":"abab...ab","round":2,"rule_ids":["GDPR-6"],"run_id":"run-1",
    "seq":1,"time":"2026-01-02T03:04:05.000006Z"}

(wrapped here; ``model_in`` is ``cd`` 32 times, ``prev`` is ``ab`` 32 times).
``sig`` (base64, split here) = ``hCNGyYbEJwFI7vLrGHkBOoMej5POzwbaf/BwFJTihPlm1lqYBzkI4B``
``/BGkb/2mr83OFQIoAbFRRhWT2sOokfDA==``;
line bytes = the body with ``,"sig":"<sig>"`` inserted between ``"seq":1`` and
``,"time"`` (``sig`` sorts after ``seq``); ``hash`` =
``fbd8a63dbb222c3d4ece54ddb937cd2558e7b6d53bb64e24a394476f1c060d77``.

Entry 0 has action ``log.created`` and run_id ``-``; its details hold
``format`` (``fedmeta.audit/1``) and ``public_key`` (the party's raw 32-byte
Ed25519 public key, base64). Entry ``checkpoint`` details hold ``head_seq`` and
``head_hash``: the entry it closes (always ``seq - 1`` and ``prev``).
Entry ``log.repaired`` records an incomplete last line moved to a side file
(``partial_file``, ``partial_bytes``, ``partial_sha256``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedmeta.audit.errors import InvalidEntryError
from fedmeta.audit.receipt import Receipt

Scalar = str | int | float | bool | None

FORMAT = "fedmeta.audit/1"
GENESIS_PREV = "0" * 64
NO_RUN = "-"
DECISIONS = ("allow", "allow-with-exclusions", "deny")
RESERVED_ACTIONS = ("checkpoint",)  # plus everything under "log."
FIELDS = (
    "seq", "time", "actor", "action", "run_id", "round", "decision", "rule_ids", "counts",
    "model_in", "model_out", "epsilon", "details", "prev", "sig",
)  # fmt: skip

MAX_STR = 512
MAX_NAME = 64
MAX_LIST = 64
MAX_DETAILS_KEYS = 32
MAX_DETAILS_BYTES = 4096
MAX_LINE_BYTES = 16384
MAX_INT = 2**63 - 1

_ACTOR_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ACTION_RE = re.compile(r"[a-z][a-z0-9_-]*(?:\.[a-z0-9_-]+)*")
_RUN_ID_RE = re.compile(r"[A-Za-z0-9._:+-]{1,128}")
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/()+-]{0,63}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_TIME_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_TIME_FMT = "%Y-%m-%dT%H:%M:%S.%fZ"


def canonical(obj: Mapping[str, Any]) -> bytes:
    """The one canonical serialisation of audit data (see module docstring)."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def utc_now() -> str:
    """Current UTC time in the entry ``time`` format."""
    return datetime.now(UTC).strftime(_TIME_FMT)


def sha256_hex(data: bytes) -> str:
    """Lowercase hex sha256 of ``data`` (the form of ``hash``, ``prev``, ``model_in/out``)."""
    return hashlib.sha256(data).hexdigest()


# ---- validation -------------------------------------------------------------------------


def _fail(field: str, msg: str) -> InvalidEntryError:
    return InvalidEntryError(f"audit entry field {field!r}: {msg}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_str(field: str, v: object, pattern: re.Pattern[str] | None, max_len: int) -> None:
    if not isinstance(v, str):
        raise _fail(field, f"must be a string, got {type(v).__name__}")
    if len(v) > max_len:
        raise _fail(field, f"string of {len(v)} chars exceeds the cap of {max_len}")
    if pattern is not None and not pattern.fullmatch(v):
        raise _fail(field, f"{v!r} does not match {pattern.pattern}")


def _check_text(field: str, v: str) -> None:
    if len(v) > MAX_STR:
        raise _fail(field, f"string of {len(v)} chars exceeds the cap of {MAX_STR}")
    if _CONTROL_RE.search(v):
        raise _fail(field, "control characters (newline, tab, NUL, ...) are not allowed")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _fail(field, "not encodable as UTF-8 (lone surrogate?)") from e


def _check_optional_hex(field: str, v: object) -> None:
    if v is not None and not (isinstance(v, str) and _HEX64_RE.fullmatch(v)):
        raise _fail(field, f"must be null or 64 lowercase hex digits (sha256), got {v!r}")


def _check_float(field: str, v: object) -> None:
    if not isinstance(v, float) or not math.isfinite(v):
        raise _fail(field, f"must be a finite float, got {v!r}")


def _check_details(details: object) -> None:
    if not isinstance(details, dict):
        raise _fail("details", f"must be a mapping, got {type(details).__name__}")
    if len(details) > MAX_DETAILS_KEYS:
        raise _fail("details", f"{len(details)} keys exceed the cap of {MAX_DETAILS_KEYS}")
    for k, v in details.items():
        _check_str("details key", k, _NAME_RE, MAX_NAME)
        where = f"details[{k!r}]"
        if isinstance(v, str):
            _check_text(where, v)
        elif v is None or isinstance(v, bool):
            pass
        elif isinstance(v, int):
            if abs(v) > MAX_INT:
                raise _fail(where, "int out of the signed 64-bit range")
        elif isinstance(v, float):
            _check_float(where, v)
        else:
            raise _fail(
                where,
                f"values must be str, int, float, bool or None (no lists, dicts or raw data), "
                f"got {type(v).__name__}",
            )
    size = len(canonical(details))
    if size > MAX_DETAILS_BYTES:
        raise _fail("details", f"{size} bytes serialised exceed the cap of {MAX_DETAILS_BYTES}")


def validate_actor(actor: object) -> None:
    """Check a party id (pseudonymous: ``server``, ``site-3``); raise InvalidEntryError."""
    _check_str("actor", actor, _ACTOR_RE, MAX_NAME)


def validate_fields(d: Mapping[str, Any]) -> None:
    """Check a JSON-shaped entry (with or without ``sig``) strictly; raise InvalidEntryError."""
    expected = set(FIELDS) if "sig" in d else set(FIELDS) - {"sig"}
    if set(d) != expected:
        missing, extra = sorted(expected - set(d)), sorted(set(d) - expected)
        raise InvalidEntryError(
            f"audit entry has missing fields {missing} / unknown fields {extra}"
        )
    seq = d["seq"]
    if not _is_int(seq) or not 0 <= seq <= MAX_INT:
        raise _fail("seq", f"must be an int >= 0, got {seq!r}")
    t = d["time"]
    _check_str("time", t, _TIME_RE, 27)
    try:
        datetime.strptime(t, _TIME_FMT)
    except ValueError as e:
        raise _fail("time", f"not a valid UTC time: {t!r}") from e
    _check_str("actor", d["actor"], _ACTOR_RE, MAX_NAME)
    _check_str("action", d["action"], _ACTION_RE, MAX_NAME)
    _check_str("run_id", d["run_id"], _RUN_ID_RE, 128)
    rnd = d["round"]
    if rnd is not None and (not _is_int(rnd) or not 0 <= rnd <= MAX_INT):
        raise _fail("round", f"must be null or an int >= 0, got {rnd!r}")
    if d["decision"] is not None and d["decision"] not in DECISIONS:
        raise _fail("decision", f"must be null or one of {DECISIONS}, got {d['decision']!r}")
    rule_ids = d["rule_ids"]
    if not isinstance(rule_ids, list) or len(rule_ids) > MAX_LIST:
        raise _fail("rule_ids", f"must be a list of at most {MAX_LIST} rule ids")
    for r in rule_ids:
        _check_str("rule_ids item", r, _NAME_RE, MAX_NAME)
    counts = d["counts"]
    if not isinstance(counts, dict) or len(counts) > MAX_LIST:
        raise _fail("counts", f"must be a mapping of at most {MAX_LIST} names to ints")
    for k, v in counts.items():
        _check_str("counts key", k, _NAME_RE, MAX_NAME)
        if not _is_int(v) or not 0 <= v <= MAX_INT:
            raise _fail(f"counts[{k!r}]", f"must be an int >= 0, got {v!r}")
    _check_optional_hex("model_in", d["model_in"])
    _check_optional_hex("model_out", d["model_out"])
    eps = d["epsilon"]
    if eps is not None:
        _check_float("epsilon", eps)
        if eps < 0:
            raise _fail("epsilon", f"must be >= 0, got {eps!r}")
    _check_details(d["details"])
    prev = d["prev"]
    if not isinstance(prev, str) or not _HEX64_RE.fullmatch(prev):
        raise _fail("prev", "must be 64 lowercase hex digits")
    if "sig" in d:
        sig = d["sig"]
        ok = isinstance(sig, str) and len(sig) == 88
        if ok:
            try:
                raw = base64.b64decode(sig, validate=True)
            except (binascii.Error, ValueError):
                ok = False
            else:
                ok = len(raw) == 64 and base64.b64encode(raw).decode("ascii") == sig
        if not ok:
            raise _fail("sig", "must be a 64-byte Ed25519 signature in canonical base64")


def _normalise_api(
    *, rule_ids: Sequence[str], counts: Mapping[str, int] | None,
    epsilon: float | None, details: Mapping[str, Scalar] | None,
) -> tuple[list[str], dict[str, int], float | None, dict[str, Scalar]]:  # fmt: skip
    if isinstance(rule_ids, str | bytes) or not isinstance(rule_ids, Sequence):
        raise _fail("rule_ids", "must be a sequence of rule id strings (not a single string)")
    if counts is not None and not isinstance(counts, Mapping):
        raise _fail("counts", f"must be a mapping, got {type(counts).__name__}")
    if details is not None and not isinstance(details, Mapping):
        raise _fail("details", f"must be a mapping, got {type(details).__name__}")
    if epsilon is not None:
        if isinstance(epsilon, bool) or not isinstance(epsilon, int | float):
            raise _fail("epsilon", f"must be a number or None, got {type(epsilon).__name__}")
        epsilon = float(epsilon)
    return list(rule_ids), dict(counts or {}), epsilon, dict(details or {})


# ---- the entry ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One signed audit entry. Build with :meth:`create`, read with :meth:`from_line`."""

    seq: int
    time: str
    actor: str
    action: str
    run_id: str
    round: int | None
    decision: str | None
    rule_ids: tuple[str, ...]
    counts: Mapping[str, int]
    model_in: str | None
    model_out: str | None
    epsilon: float | None
    details: Mapping[str, Scalar]
    prev: str
    sig: str

    # -- serialisation
    def to_dict(self, *, with_sig: bool = True) -> dict[str, Any]:
        """JSON-shaped dict of the entry (``sig`` left out when ``with_sig`` is False)."""
        d: dict[str, Any] = {
            "seq": self.seq, "time": self.time, "actor": self.actor, "action": self.action,
            "run_id": self.run_id, "round": self.round, "decision": self.decision,
            "rule_ids": list(self.rule_ids), "counts": dict(self.counts),
            "model_in": self.model_in, "model_out": self.model_out, "epsilon": self.epsilon,
            "details": dict(self.details), "prev": self.prev,
        }  # fmt: skip
        if with_sig:
            d["sig"] = self.sig
        return d

    def body_bytes(self) -> bytes:
        """Canonical bytes of the entry without ``sig``: what the signature covers."""
        return canonical(self.to_dict(with_sig=False))

    def line_bytes(self) -> bytes:
        """Canonical bytes of the whole entry: the stored line without its newline."""
        return canonical(self.to_dict())

    @property
    def hash(self) -> str:
        """sha256 of :meth:`line_bytes`, lowercase hex (recomputed, never stored)."""
        return sha256_hex(self.line_bytes())

    def receipt(self) -> Receipt:
        return Receipt(self.seq, self.hash)

    def verify_signature(self, public_key: Ed25519PublicKey) -> bool:
        try:
            public_key.verify(base64.b64decode(self.sig), self.body_bytes())
        except InvalidSignature:
            return False
        return True

    # -- construction
    @classmethod
    def _from_valid_dict(cls, d: Mapping[str, Any]) -> Entry:
        return cls(
            seq=d["seq"], time=d["time"], actor=d["actor"], action=d["action"],
            run_id=d["run_id"], round=d["round"], decision=d["decision"],
            rule_ids=tuple(d["rule_ids"]), counts=MappingProxyType(dict(d["counts"])),
            model_in=d["model_in"], model_out=d["model_out"], epsilon=d["epsilon"],
            details=MappingProxyType(dict(d["details"])), prev=d["prev"], sig=d["sig"],
        )  # fmt: skip

    @classmethod
    def create(
        cls,
        key: Ed25519PrivateKey,
        *,
        seq: int,
        prev: str,
        actor: str,
        action: str,
        run_id: str,
        round: int | None = None,
        decision: str | None = None,
        rule_ids: Sequence[str] = (),
        counts: Mapping[str, int] | None = None,
        model_in: str | None = None,
        model_out: str | None = None,
        epsilon: float | None = None,
        details: Mapping[str, Scalar] | None = None,
        time: str | None = None,
    ) -> Entry:
        """Validate the fields, sign the body with ``key`` and return the entry."""
        rule_list, counts_d, eps, details_d = _normalise_api(
            rule_ids=rule_ids, counts=counts, epsilon=epsilon, details=details
        )
        body: dict[str, Any] = {
            "seq": seq, "time": time or utc_now(), "actor": actor, "action": action,
            "run_id": run_id, "round": round, "decision": decision, "rule_ids": rule_list,
            "counts": counts_d, "model_in": model_in, "model_out": model_out, "epsilon": eps,
            "details": details_d, "prev": prev,
        }  # fmt: skip
        validate_fields(body)
        sig = base64.b64encode(key.sign(canonical(body))).decode("ascii")
        entry = cls._from_valid_dict({**body, "sig": sig})
        size = len(entry.line_bytes()) + 1
        if size > MAX_LINE_BYTES:
            raise InvalidEntryError(
                f"audit entry of {size} bytes exceeds {MAX_LINE_BYTES}; keep entries small "
                "(record bulky evidence in a file and log its sha256)"
            )
        return entry

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Entry:
        """Strictly validate a parsed JSON entry (with ``sig``)."""
        if "sig" not in d:
            raise InvalidEntryError("audit entry has no 'sig' field")
        validate_fields(d)
        return cls._from_valid_dict(d)

    @classmethod
    def from_line(cls, line: bytes) -> Entry:
        """Parse one stored line (without its newline), requiring the exact canonical bytes."""
        if len(line) >= MAX_LINE_BYTES:
            raise InvalidEntryError(f"line of {len(line)} bytes exceeds {MAX_LINE_BYTES}")
        entry = cls.from_dict(parse_json_object(line))
        if entry.line_bytes() != line:
            raise InvalidEntryError(
                "line is not in canonical form (bytes differ from the canonical serialisation "
                "of its own content: whitespace, key order, escaping or number spelling changed)"
            )
        return entry


class UnparsableLineError(InvalidEntryError):
    """A line is not even a JSON object (torn write, NUL fill, binary garbage)."""


def parse_json_object(line: bytes) -> dict[str, Any]:
    """Decode one line as a JSON object; raise :class:`UnparsableLineError` if it is not one."""

    def _no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not allowed")

    try:
        obj = json.loads(line.decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UnparsableLineError(f"not a JSON object: {str(e).splitlines()[0][:120]}") from e
    if not isinstance(obj, dict):
        raise UnparsableLineError(f"not a JSON object but a {type(obj).__name__}")
    return obj
