"""Keys from outside the run directory: ``fedmeta report RUN --trust KEYS``.

Whoever holds a run directory holds every public key in it (and, in a
simulation, every private key): a log checked only against those keys proves
nothing against that holder. ``--trust`` (repeatable) names the keys the data
protection officer obtained out of band; each is one of:

* a directory of ``<party>.pub.pem`` files, e.g. the coordinator kit's
  ``site-audit-keys/`` (``server-audit-signing.pub.pem`` counts as ``server``);
* a public key file (PEM or raw base64) named ``<party>.pub.pem``, or a site
  kit's own ``keys/audit-signing.pub.pem`` (the party is the kit directory's
  name: ``sites/<id>/keys/audit-signing.pub.pem``);
* ``PARTY=VALUE``: VALUE a key file, a raw base64 Ed25519 key, or a full
  SHA-256 fingerprint (``sha256:`` + 64 hex digits);
* a trust file: lines ``PARTY = VALUE`` (``#`` comments), VALUE as above, a
  relative key-file path being relative to the trust file.

A fingerprint is always the full SHA-256 of the raw 32-byte public key; a
shortened one is refused (a prefix can be matched by a forged key).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fedmeta.audit.errors import AuditError
from fedmeta.audit.keys import fingerprint, load_public_key
from fedmeta.paths import SERVER_AUDIT_KEY, SITE_AUDIT_PUBKEY

SERVER = "server"
SERVER_KEY_STEM = SERVER_AUDIT_KEY.stem
SITE_KEY_NAME = SITE_AUDIT_PUBKEY.name
_FP_RE = re.compile(r"(?:sha256:)?([0-9a-fA-F]{64})")
_PARTY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class TrustError(ValueError):
    """A ``--trust`` argument cannot be used (one line naming it)."""


@dataclass(frozen=True)
class Anchor:
    """One party's key as given from outside the run: its full fingerprint and where from."""

    party: str
    fingerprint: str  # "sha256:" + 64 lowercase hex digits
    source: str


def _party_of_file(path: Path) -> str | None:
    name = path.name
    if name == SITE_KEY_NAME and path.parent.name == "keys":
        return path.parent.parent.name or None
    for suffix in (".pub.pem", ".pub", ".pem"):
        if name.endswith(suffix) and len(name) > len(suffix):
            stem = name[: -len(suffix)]
            return SERVER if stem == SERVER_KEY_STEM else stem
    return None


def _key_file(path: Path, where: str) -> str:
    try:
        return fingerprint(load_public_key(path))
    except AuditError as exc:
        raise TrustError(f"{where}: {exc}") from None


def _value(value: str, base: Path | None, where: str) -> str:
    """The fingerprint a VALUE names (fingerprint, raw base64 key or key file)."""
    value = value.strip()
    m = _FP_RE.fullmatch(value)
    if m:
        return "sha256:" + m.group(1).lower()
    if value.startswith("sha256:"):
        raise TrustError(
            f"{where}: {value!r} is not a full SHA-256 fingerprint (sha256: and "
            "64 hex digits; a shortened fingerprint is not accepted)"
        )
    path = Path(value)
    if base is not None and not path.is_absolute():
        path = base / path
    if path.is_file():
        return _key_file(path, where)
    try:
        return fingerprint(load_public_key(value.encode("ascii")))
    except (AuditError, UnicodeEncodeError):
        raise TrustError(
            f"{where}: {value!r} is neither a key file, a base64 Ed25519 key nor "
            "a full sha256 fingerprint"
        ) from None


def _check_party(party: str, where: str) -> str:
    if not _PARTY_RE.fullmatch(party):
        raise TrustError(f"{where}: {party!r} is not a party id (server, site-3, ...)")
    return party


def _trust_file(path: Path) -> list[Anchor]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TrustError(f"{path}: cannot read the trust file ({exc})") from None
    out = []
    for no, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path} line {no}"
        party, sep, value = line.partition("=")
        if not sep:
            parts = line.split(None, 1)
            if len(parts) != 2:
                raise TrustError(f"{where}: expected 'PARTY = KEY-OR-FINGERPRINT'")
            party, value = parts
        party = _check_party(party.strip().strip('"'), where)
        out.append(Anchor(party, _value(value.strip().strip('"'), path.parent, where), where))
    if not out:
        raise TrustError(f"{path}: no 'PARTY = KEY-OR-FINGERPRINT' line")
    return out


def _one(spec: str) -> list[Anchor]:
    path = Path(spec)
    if path.is_dir():
        out = [
            Anchor(p, _key_file(f, str(f)), str(f))
            for f in sorted(path.iterdir())
            if f.is_file() and (p := _party_of_file(f)) is not None
        ]
        if not out:
            raise TrustError(f"--trust {spec}: no <party>.pub.pem key file in the directory")
        return out
    if path.is_file():
        try:
            head = path.read_bytes()[:64]
        except OSError as exc:
            raise TrustError(f"--trust {spec}: cannot read ({exc.strerror or exc})") from None
        if head.lstrip().startswith(b"-----BEGIN"):
            party = _party_of_file(path)
            if party is None:
                raise TrustError(
                    f"--trust {spec}: cannot tell whose key this is from its name; "
                    "give it as PARTY=FILE"
                )
            return [Anchor(party, _key_file(path, f"--trust {spec}"), str(path))]
        return _trust_file(path)
    party, sep, value = spec.partition("=")
    if sep:
        where = f"--trust {spec}"
        return [Anchor(_check_party(party.strip(), where), _value(value, None, where), where)]
    raise TrustError(
        f"--trust {spec}: no such file or directory (give a key file, a directory "
        "of <party>.pub.pem, a trust file or PARTY=KEY-OR-FINGERPRINT)"
    )


def load_trust(specs: list[str] | tuple[str, ...]) -> dict[str, Anchor]:
    """Party -> :class:`Anchor` from every ``--trust`` argument; two different keys given
    for one party are an error."""
    out: dict[str, Anchor] = {}
    for spec in specs:
        for anchor in _one(str(spec)):
            old = out.get(anchor.party)
            if old is not None and old.fingerprint != anchor.fingerprint:
                raise TrustError(
                    f"{anchor.source}: gives {anchor.party} another key than {old.source}"
                )
            out.setdefault(anchor.party, anchor)
    return out
