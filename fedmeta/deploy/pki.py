"""The federation's keys and certificates, made with ``cryptography`` (no openssl).

* Federation CA: ECDSA P-384, self-signed, ``BasicConstraints(ca, path_length=0)``.
  Its private key (``ca/ca.key``) never goes into a kit.
* SuperLink TLS certificate: ECDSA P-256 key, issued by the CA, with the DNS names
  and IP addresses of the federation file as subjectAltName, serverAuth only.
* SuperNode authentication key (one per site): ECDSA P-384, the formats Flower 1.42
  reads: private key in OpenSSH format (``flower-supernode --auth-supernode-private-key``
  loads it with ``load_ssh_private_key``), public key as one OpenSSH line
  ``ecdsa-sha2-nistp384 AAAA... site-id`` (``flwr supernode register`` loads it with
  ``load_ssh_public_key`` and requires a NIST curve).

Private keys are written with :func:`write_private`: created by ``os.open`` with mode
0600 (never chmod-ed afterwards), fsync-ed, then renamed into place.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import stat
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmeta.audit._fs import write_new_file
from fedmeta.deploy.federation import is_ip

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


class PkiError(ValueError):
    """A key or certificate file that cannot be used; one line naming the file."""


# ---- files -------------------------------------------------------------------------
def _replace(path: Path, data: bytes, mode: int, widen: bool = False) -> None:
    """Write ``data`` to a fresh temp file created with ``mode``, fsync, rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    write_new_file(tmp, data, mode)
    if widen:
        os.chmod(tmp, mode)  # the umask may have narrowed it; public files may be wider
    os.replace(tmp, path)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret: mode 0600 from creation, fsync, atomic rename (replaces ``path``)."""
    _replace(path, data, PRIVATE_MODE)


def write_public(path: Path, data: bytes, mode: int = PUBLIC_MODE) -> None:
    """Write a non-secret file (certificate, public key, script) atomically."""
    _replace(path, data, mode, widen=True)


def read_private(path: Path) -> bytes:
    """Bytes of a private key file, refusing one that group or others may access."""
    path = Path(path)
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise PkiError(f"{path}: private key not found") from None
    if not stat.S_ISREG(st.st_mode):
        raise PkiError(f"{path}: private key is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise PkiError(
            f"{path}: private key has mode {mode:04o}; it must be 0600 "
            f"(check nobody copied it, then 'chmod 600 {path}')"
        )
    return path.read_bytes()


# ---- certificates ------------------------------------------------------------------
def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _general_name(name: str) -> x509.GeneralName:
    if is_ip(name):
        return x509.IPAddress(ipaddress.ip_address(name))
    return x509.DNSName(name)


def create_ca(federation: str, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new federation CA (key, self-signed certificate)."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"{federation} federation CA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, federation),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _leaf_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    public_key,
    common_name: str,
    usage: x509.ObjectIdentifier,
    days: int,
    names: tuple[str, ...] = (),
) -> x509.Certificate:
    """A CA-signed end-entity certificate: ``usage`` (server or client auth) only, valid for
    ``days`` but never past the CA, with subject alternative names ``names`` if given."""
    not_after = min(_now() + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False
        )
    return (
        builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=False,
                crl_sign=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )


def issue_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    names: tuple[str, ...],
    days: int,
) -> x509.Certificate:
    """The SuperLink's TLS certificate for ``names`` (DNS names and IPs), signed by the CA."""
    if not names:
        raise PkiError("the SuperLink certificate needs at least one DNS name or IP address")
    return _leaf_cert(
        ca_key, ca_cert, key.public_key(), names[0], ExtendedKeyUsageOID.SERVER_AUTH, days, names
    )


def site_csr(key: ec.EllipticCurvePrivateKey, site_id: str) -> x509.CertificateSigningRequest:
    """The site's certificate signing request for its TLS client certificate (CN = site id)."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site_id)]))
        .sign(key, hashes.SHA256())
    )


def load_csr(data: bytes, source: str) -> x509.CertificateSigningRequest:
    """A PEM CSR whose self-signature verifies (the requester holds the private key)."""
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise PkiError(f"{source}: not a PEM certificate signing request ({exc})") from None
    try:
        valid = csr.is_signature_valid
        key = csr.public_key()
    except ValueError as exc:  # an altered key or signature may not even parse
        raise PkiError(f"{source}: the CSR cannot be read ({exc}): altered in transit?") from None
    if not valid:
        raise PkiError(f"{source}: the CSR's signature does not verify (altered in transit?)")
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, NIST_CURVES):
        raise PkiError(f"{source}: the CSR's key is not ECDSA on a NIST curve")
    return csr


def issue_client_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    csr: x509.CertificateSigningRequest,
    site_id: str,
    days: int,
) -> x509.Certificate:
    """A TLS client certificate (clientAuth only, CN = site id) for the CSR's public key.

    The subject is set from ``site_id`` (the federation file), never copied from the CSR."""
    return _leaf_cert(
        ca_key, ca_cert, csr.public_key(), site_id, ExtendedKeyUsageOID.CLIENT_AUTH, days
    )


def csr_common_name(csr: x509.CertificateSigningRequest) -> str:
    attrs = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def cert_common_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (what uvicorn's ``ssl_keyfile`` and Flower read)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def new_tls_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError:
        raise PkiError(f"{path}: certificate not found") from None
    except ValueError as exc:
        raise PkiError(f"{path}: not a PEM certificate ({exc})") from None


def load_ec_private_pem(path: Path) -> ec.EllipticCurvePrivateKey:
    data = read_private(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path}: not an ECDSA private key")
    return key


def cert_names(cert: x509.Certificate) -> tuple[str, ...]:
    """The DNS names and IP addresses of a certificate's subjectAltName."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(san.get_values_for_type(x509.DNSName)) + tuple(
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    )


def days_left(cert: x509.Certificate) -> float:
    return (cert.not_valid_after_utc - _now()).total_seconds() / 86400


def signed_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


# ---- SuperNode authentication keys ---------------------------------------------------
def new_node_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def node_private_openssh(key: ec.EllipticCurvePrivateKey) -> bytes:
    """OpenSSH private key format, unencrypted (``--auth-supernode-private-key``)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )


def node_public_openssh(
    key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey, comment: str = ""
) -> bytes:
    """One OpenSSH public key line (``flwr supernode register KEY.pub``)."""
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    line = pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line + (b" " + comment.encode() if comment else b"") + b"\n"


def load_node_private(path: Path) -> ec.EllipticCurvePrivateKey:
    """A SuperNode auth private key, as Flower loads it; refuses wide permissions."""
    data = read_private(path)
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{path}: not an unencrypted OpenSSH private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, NIST_CURVES):
        raise PkiError(f"{path}: not an ECDSA key on a NIST curve (Flower needs one)")
    return key


def load_node_public(path: Path) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_ssh_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise PkiError(f"{path}: public key not found") from None
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{path}: not an OpenSSH public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, NIST_CURVES):
        raise PkiError(f"{path}: not an ECDSA public key on a NIST curve")
    return key


def same_public_key(a: ec.EllipticCurvePublicKey, b: ec.EllipticCurvePublicKey) -> bool:
    fmt = (serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return a.public_bytes(*fmt) == b.public_bytes(*fmt)


def node_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """``SHA256:...`` like ``ssh-keygen -lf`` prints it."""
    import base64
    import hashlib

    blob = base64.b64decode(
        key.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ).split()[1]
    )
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
