"""A site's request file: its public keys, sent to the provisioner (like a CSR).

``fedmeta node init`` creates the site's private keys on the site's machine and writes
``<site-dir>/request-<site-id>.json``::

    {"format": "fedmeta-site-request/1", "federation": "...", "site_id": "...",
     "supernode_public_key": "ecdsa-sha2-nistp384 AAAA... site-id",
     "audit_public_key": "-----BEGIN PUBLIC KEY-----...",      (Ed25519)
     "tls_csr": "-----BEGIN CERTIFICATE REQUEST-----..."}      (CN = site id, self-signed)

The provisioner (``fedmeta provision ... --request FILE``) accepts it only if it names
a site of the federation, every key parses, the CSR's signature verifies (the site
holds the key) and no private key is in it. The file is deterministic for given keys,
so its SHA-256 can be read out over the phone to check it arrived unaltered.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from pydantic import BaseModel, ConfigDict, ValidationError

from fedmeta.deploy import pki
from policies.validation import SiteId, format_validation_error

FORMAT = "fedmeta-site-request/1"


class RequestError(ValueError):
    """A request file that cannot be accepted; one line naming the file."""


class SiteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str
    federation: str
    site_id: SiteId
    supernode_public_key: str
    audit_public_key: str
    tls_csr: str


def request_name(site_id: str) -> str:
    return f"request-{site_id}.json"


def request_bytes(req: SiteRequest) -> bytes:
    return (json.dumps(req.model_dump(), indent=2, sort_keys=True) + "\n").encode()


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_request(
    federation: str, site_id: str, node_pub: bytes, audit_pub_pem: bytes, tls_key
) -> SiteRequest:
    csr = pki.site_csr(tls_key, site_id)
    return SiteRequest(
        format=FORMAT,
        federation=federation,
        site_id=site_id,
        supernode_public_key=node_pub.decode().strip(),
        audit_public_key=audit_pub_pem.decode().strip(),
        tls_csr=csr.public_bytes(serialization.Encoding.PEM).decode().strip(),
    )


def load_request(
    path: Path, federation: str | None = None, site_ids: set[str] | None = None
) -> SiteRequest:
    """Read and check a request file; RequestError (one line) names the file and the field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RequestError(f"{path}: request file not found: check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RequestError(f"{path}: cannot read the request file ({exc})") from None
    if "PRIVATE KEY" in text:
        raise RequestError(
            f"{path}: holds a PRIVATE KEY: never send one; the site runs "
            "`fedmeta node init` and sends only request-<site-id>.json"
        )
    try:
        req = SiteRequest.model_validate_json(text)
    except ValidationError as exc:
        raise RequestError(
            format_validation_error(exc, str(path), model=SiteRequest, whole="not a request file")
        ) from None
    if req.format != FORMAT:
        raise RequestError(f"{path}: field 'format': {req.format!r} is not {FORMAT!r}")
    if federation is not None and req.federation != federation:
        raise RequestError(
            f"{path}: field 'federation': {req.federation!r} is not this "
            f"federation ({federation!r}): a request for another federation"
        )
    if site_ids is not None and req.site_id not in site_ids:
        raise RequestError(
            f"{path}: field 'site_id': {req.site_id!r} is not a site of the "
            "federation file: add its [[sites]] entry first"
        )
    try:
        key = serialization.load_ssh_public_key(req.supernode_public_key.encode())
        if not isinstance(key, pki.ec.EllipticCurvePublicKey) or not isinstance(
            key.curve, pki.NIST_CURVES
        ):
            raise ValueError("not ECDSA on a NIST curve")
    except (ValueError, TypeError) as exc:
        raise RequestError(
            f"{path}: field 'supernode_public_key': not an OpenSSH ECDSA public key ({exc})"
        ) from None
    from cryptography.hazmat.primitives.asymmetric import ed25519

    try:
        audit = serialization.load_pem_public_key(req.audit_public_key.encode())
    except (ValueError, TypeError) as exc:
        raise RequestError(
            f"{path}: field 'audit_public_key': not a PEM public key ({exc})"
        ) from None
    if not isinstance(audit, ed25519.Ed25519PublicKey):
        raise RequestError(f"{path}: field 'audit_public_key': not an Ed25519 key")
    try:
        csr = pki.load_csr(req.tls_csr.encode(), f"{path}: field 'tls_csr'")
    except pki.PkiError as exc:
        raise RequestError(str(exc)) from None
    if pki.csr_common_name(csr) != req.site_id:
        raise RequestError(f"{path}: field 'tls_csr': its subject is not CN={req.site_id}")
    return req
