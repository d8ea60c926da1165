"""A site's node directory: ``fedmeta node init`` lays it out, ``fedmeta node check`` checks it.

A site directory is where one institution's node keeps its state::

    <site-dir>/ca.pem  client.pem  node.toml  start-node.sh  README.md  manifest.toml
    <site-dir>/flwr-offline.env  request-<site-id>.json (public: send it to the provisioner)
    <site-dir>/keys/supernode-auth.key (0600) + .pub, audit-signing.pem (0600) + .pub.pem,
                    tls-client.key (0600)    -- created here, never anywhere else
    <site-dir>/keys/retired/          former SuperNode keys (after a rotation)
    <site-dir>/audit/audit-log.jsonl  the site's signed audit log (first round creates it)
    <site-dir>/privacy-ledger.jsonl   the durable privacy ledger (first round creates it)
    <site-dir>/flwr-home/             Flower's own files (apps received), safe to delete

It is the kit plus state: ``init`` copies a kit into it (or completes a kit
unpacked in place), creates the site's private keys when they are missing (they are
born here), writes the request file with their public halves, and never overwrites a
key or a manifest that is there.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import ssl
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from fedmeta.audit import AuditError, verify_log
from fedmeta.audit.keys import (
    create_key,
    load_private_key,
    load_public_key,
    public_key_path,
    public_raw_b64,
)
from fedmeta.deploy import pki
from fedmeta.deploy.kits import SCRIPT_MODE
from fedmeta.deploy.request import (
    SiteRequest,
    build_request,
    request_bytes,
    request_name,
    sha256_file,
)
from fedmeta.deploy.templates import ENV_FILE, TODO
from fedmeta.paths import (
    AUDIT_DIR,
    CA_CERT,
    CLIENT_CERT,
    KEYS_DIR,
    LEDGER_FILE,
    MARKER_FILE,
    NODE_KEY,
    NODE_PUB,
    NODE_SCRIPT,
    NODE_TOML,
    PINNED_SERVER_KEY,
    RETIRED_KEYS,
    TLS_KEY,
)
from fedmeta.paths import MANIFEST_FILE as MANIFEST
from fedmeta.paths import SITE_AUDIT_KEY as AUDIT_KEY
from fedmeta.paths import SITE_AUDIT_LOG as AUDIT_LOG
from policies import DeclarationError, load_site_manifest

KIT_FILES = (CA_CERT, NODE_TOML, NODE_SCRIPT, "README.md", ENV_FILE)
OPTIONAL_KIT_FILES = ("constraints.txt", "systemd/fedmeta-node.service", PINNED_SERVER_KEY)


class NodeError(ValueError):
    """The site directory or kit cannot be used; one line naming the file."""


# ---- init ----------------------------------------------------------------------------
@dataclass
class InitReport:
    site_dir: Path
    copied: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    new_public_key: Path | None = None
    created: list[str] = field(default_factory=list)
    request: Path | None = None
    request_sha256: str = ""


def _site_keys(site_dir: Path, site_id: str, report: InitReport) -> None:
    """Create the site's private keys where they are missing (0600, on this machine)."""
    key, pub = site_dir / NODE_KEY, site_dir / NODE_PUB
    if key.exists():
        node = pki.load_node_private(key)
        report.kept.append(str(NODE_KEY))
    else:
        node = pki.new_node_key()
        pki.write_private(key, pki.node_private_openssh(node))
        report.created.append(str(NODE_KEY))
    pki.write_public(pub, pki.node_public_openssh(node, site_id))
    audit = site_dir / AUDIT_KEY
    if audit.exists():
        load_private_key(audit)  # Ed25519 and 0600, or KeyFileError
        report.kept.append(str(AUDIT_KEY))
    else:
        create_key(audit)
        report.created.append(str(AUDIT_KEY))
    tls = site_dir / TLS_KEY
    if tls.exists():
        pki.load_ec_private_pem(tls)
        report.kept.append(str(TLS_KEY))
    else:
        pki.write_private(tls, pki.key_pem(pki.new_tls_key()))
        report.created.append(str(TLS_KEY))


def write_site_request(site_dir: Path, node: dict) -> Path:
    """``request-<site-id>.json``: the public halves of the site's keys and a CSR."""
    site_id = str(node["site_id"])
    req = build_request(
        str(node.get("federation", "")),
        site_id,
        (site_dir / NODE_PUB).read_bytes(),
        public_key_path(site_dir / AUDIT_KEY).read_bytes(),
        pki.load_ec_private_pem(site_dir / TLS_KEY),
    )
    path = site_dir / request_name(site_id)
    with contextlib.suppress(OSError, ValueError):
        old = SiteRequest.model_validate_json(path.read_text(encoding="utf-8"))
        same_csr_key = pki.same_public_key(
            pki.load_csr(old.tls_csr.encode(), str(path)).public_key(),
            pki.load_csr(req.tls_csr.encode(), str(path)).public_key(),
        )
        if same_csr_key and old.model_dump(exclude={"tls_csr"}) == req.model_dump(
            exclude={"tls_csr"}
        ):
            return path  # same keys: keep the file (an ECDSA CSR signature is randomised)
    pki.write_public(path, request_bytes(req))
    return path


def _client_cert(kit: Path, site_dir: Path, report: InitReport) -> None:
    """Copy the kit's client.pem if it certifies this site's TLS key."""
    src = kit / CLIENT_CERT
    if not src.exists():
        return
    cert = pki.load_cert(src)
    key = pki.load_ec_private_pem(site_dir / TLS_KEY)
    if not pki.same_public_key(cert.public_key(), key.public_key()):
        report.notes.append(
            f"{src}: not issued for this site's TLS key (an older request?): "
            f"send {request_name(str(read_node_toml(site_dir)['site_id']))} "
            "to the provisioner again"
        )
        return
    pki.write_public(site_dir / CLIENT_CERT, src.read_bytes())
    report.copied.append(CLIENT_CERT)


def rotate_node_key(site_dir: Path, site_id: str) -> Path:
    """Retire the SuperNode key (to keys/retired/) and create a new one; returns the new .pub."""
    key, pub = site_dir / NODE_KEY, site_dir / NODE_PUB
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    retired = site_dir / RETIRED_KEYS
    retired.mkdir(mode=0o700, exist_ok=True)
    if key.exists():
        pki.write_private(retired / f"supernode-auth-{stamp}.key", pki.read_private(key))
    if pub.exists():
        pki.write_public(retired / f"supernode-auth-{stamp}.pub", pub.read_bytes())
    new = pki.new_node_key()
    pki.write_private(key, pki.node_private_openssh(new))
    pki.write_public(pub, pki.node_public_openssh(new, site_id))
    return pub


def read_node_toml(site_dir: Path) -> dict:
    path = Path(site_dir) / NODE_TOML
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NodeError(
            f"{path}: not found: is {site_dir} a site kit or an initialised "
            "site directory? (fedmeta node init SITE_DIR --kit KIT)"
        ) from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise NodeError(f"{path}: cannot read the node config ({exc})") from None
    for key, kind in (
        ("site_id", str),
        ("site_index", int),
        ("superlink", str),
        ("runtime_port", int),
    ):
        if not isinstance(data.get(key), kind):
            raise NodeError(f"{path}: field '{key}': missing or not a {kind.__name__}")
    return data


def init_site(
    site_dir: Path,
    kit: Path | None = None,
    new_auth_key: bool = False,
    fingerprint: str | None = None,
) -> InitReport:
    """Lay out ``site_dir`` from ``kit`` (or complete a kit unpacked in ``site_dir``); with
    ``fingerprint``, first check the kit is exactly the one the provisioner fingerprinted."""
    if fingerprint is not None:
        if kit is None:
            raise NodeError("--fingerprint checks a kit: give --kit KIT too")
        from fedmeta.deploy.kits import verify_kit

        verify_kit(Path(kit), fingerprint)
    site_dir = Path(site_dir).absolute()
    if any(c in str(site_dir) for c in "\"\\'"):
        raise NodeError(
            f"{site_dir}: the site directory path must not contain quotes or "
            "backslashes (it is passed in --node-config)"
        )
    report = InitReport(site_dir=site_dir)
    if kit is not None:
        kit = Path(kit)
        read_node_toml(kit)  # is it a site kit?
        site_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (site_dir / KEYS_DIR).mkdir(mode=0o700, exist_ok=True)
        if kit.absolute() != site_dir:
            if (kit / KEYS_DIR).is_dir() and any((kit / KEYS_DIR).iterdir()):
                raise NodeError(
                    f"{kit / 'keys'}: a kit must hold no keys (a site's keys are "
                    "created by `fedmeta node init` on the site's machine)"
                )
            for name in KIT_FILES:
                mode = SCRIPT_MODE if name.endswith(".sh") else pki.PUBLIC_MODE
                pki.write_public(site_dir / name, (kit / name).read_bytes(), mode)
                report.copied.append(name)
            for name in OPTIONAL_KIT_FILES:
                if (kit / name).exists():
                    pki.write_public(site_dir / name, (kit / name).read_bytes())
                    report.copied.append(name)
            if (site_dir / MANIFEST).exists():
                report.kept.append(MANIFEST)
            else:
                pki.write_public(site_dir / MANIFEST, (kit / MANIFEST).read_bytes())
                report.copied.append(MANIFEST)
    node = read_node_toml(site_dir)
    for needed in (CA_CERT, NODE_SCRIPT, MANIFEST):
        if not (site_dir / needed).exists():
            raise NodeError(
                f"{site_dir / needed}: missing; copy the site's kit again "
                "(fedmeta node init SITE_DIR --kit KIT)"
            )
    (site_dir / KEYS_DIR).mkdir(mode=0o700, exist_ok=True)
    (site_dir / KEYS_DIR).chmod(0o700)
    (site_dir / AUDIT_DIR).mkdir(mode=0o700, exist_ok=True)
    _site_keys(site_dir, str(node["site_id"]), report)
    if new_auth_key:
        report.new_public_key = rotate_node_key(site_dir, str(node["site_id"]))
        report.notes.append(
            "new SuperNode key (the old one is in keys/retired/): send the "
            "new request file to the provisioner"
        )
    if kit is not None:
        _client_cert(Path(kit), site_dir, report)
    report.request = write_site_request(site_dir, node)
    report.request_sha256 = sha256_file(report.request)
    if not (site_dir / CLIENT_CERT).exists():
        report.notes.append(
            f"no client.pem yet: send {report.request.name} to the "
            "provisioner, then run init again with the kit it returns"
        )
    if (site_dir / MARKER_FILE).exists() and not (site_dir / LEDGER_FILE).exists():
        report.notes.append(
            f"{MARKER_FILE} says this site trained before but "
            f"{LEDGER_FILE} is missing: restore it from backup"
        )
    return report


# ---- check ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    warning: bool = False  # passed, but someone should look


def _check(name: str, fn) -> Check:
    try:
        detail, warning = fn()
    except (
        NodeError,
        pki.PkiError,
        AuditError,
        DeclarationError,
        OSError,
        ValueError,
        RuntimeError,
    ) as exc:  # LedgerError is a RuntimeError
        return Check(name, False, " ".join(str(exc).split()))
    return Check(name, True, detail, warning)


def _mode_ok(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise NodeError(f"{path}: mode {mode:04o}, must be 0600 ('chmod 600 {path}')")


def tls_probe(
    host: str,
    port: int,
    cafile: Path,
    timeout: float = 5.0,
    client: tuple[Path, Path] | None = None,
) -> str:
    """TLS handshake with ``host:port``, verifying the chain against ``cafile`` and the
    certificate's names against ``host`` (SNI sent), presenting ``client`` (certificate,
    key) when given; then one HTTP request, so a server that refuses the client
    certificate after a TLS 1.3 handshake is caught too. Returns a one-line description."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if client is not None:
        ctx.load_cert_chain(str(client[0]), str(client[1]))
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        version = tls.version()
        tls.sendall(
            f"GET /fedmeta-node-check HTTP/1.1\r\nHost: {host}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        status = tls.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace")
        if " 400 " in status or " 495 " in status or " 496 " in status or not status:
            raise ssl.SSLError(f"the server refused this client's certificate ({status!r})")
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    return (
        f"{host}:{port} {version}, certificate for {', '.join(pki.cert_names(cert))} "
        f"valid {pki.days_left(cert):.0f} more days"
    )


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise NodeError(f"SuperLink address {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def check_site(
    site_dir: Path,
    superlink: str | None = None,
    root_cert: Path | None = None,
    connect: bool = True,
    insecure: bool = False,
) -> list[Check]:
    """Every check of ``fedmeta node check``, in order; all ``ok`` means ready to start."""
    site_dir = Path(site_dir)
    checks: list[Check] = []
    node: dict = {}

    def node_config():
        node.update(read_node_toml(site_dir))
        script = site_dir / NODE_SCRIPT
        if not script.exists() or not os.access(script, os.X_OK):
            raise NodeError(f"{script}: missing or not executable")
        return (
            f"site {node['site_id']} (index {node['site_index']}), SuperLink "
            f"{node['superlink']}, local port {node['runtime_port']}"
        ), False

    checks.append(_check("node config", node_config))

    def manifest():
        m = load_site_manifest(site_dir / MANIFEST)
        todo = [k for k, v in m.model_dump().items() if isinstance(v, str) and TODO in v]
        if todo:
            raise NodeError(
                f"{site_dir / MANIFEST}: fill in the TODO placeholders ({', '.join(todo)})"
            )
        if node and m.site_id != node["site_id"]:
            raise NodeError(
                f"{site_dir / MANIFEST}: site_id {m.site_id!r} differs from "
                f"node.toml's {node['site_id']!r}"
            )
        return (
            f"{m.site_id}: {m.institution} ({m.country}), packs "
            f"{', '.join(m.law_packs)}, epsilon_max {m.epsilon_max:g}"
        ), False

    checks.append(_check("manifest", manifest))

    ca_path = Path(root_cert) if root_cert else site_dir / CA_CERT

    def ca():
        from cryptography import x509

        cert = pki.load_cert(ca_path)
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if not bc.ca:
            raise NodeError(f"{ca_path}: not a CA certificate")
        left = pki.days_left(cert)
        if left <= 0:
            raise NodeError(f"{ca_path}: expired {-left:.0f} days ago")
        return f"{cert.subject.rfc4514_string()}, valid {left:.0f} more days", left < 60

    checks.append(_check("CA certificate", ca))

    def node_key():
        key_path = site_dir / NODE_KEY
        _mode_ok(key_path)
        key = pki.load_node_private(key_path)
        pub = pki.load_node_public(site_dir / NODE_PUB)
        if not pki.same_public_key(key.public_key(), pub):
            raise NodeError(f"{site_dir / NODE_PUB}: is not the public half of {key_path}")
        return (
            f"ECDSA {key.curve.name}, {pki.node_fingerprint(pub)} (the coordinator "
            "registers keys/supernode-auth.pub)"
        ), False

    checks.append(_check("SuperNode key", node_key))

    def client_cert():
        path = site_dir / CLIENT_CERT
        if not path.exists():
            name = request_name(str(node.get("site_id", "<site-id>")))
            raise NodeError(
                f"{path}: missing: send {name} to the provisioner, then run "
                "`fedmeta node init SITE_DIR --kit KIT` with the kit it returns"
            )
        cert = pki.load_cert(path)
        _mode_ok(site_dir / TLS_KEY)
        key = pki.load_ec_private_pem(site_dir / TLS_KEY)
        if not pki.same_public_key(cert.public_key(), key.public_key()):
            raise NodeError(f"{path}: does not certify {site_dir / TLS_KEY}")
        if not pki.signed_by(cert, pki.load_cert(ca_path)):
            raise NodeError(f"{path}: not issued by the federation CA ({ca_path})")
        left = pki.days_left(cert)
        if left <= 0:
            raise NodeError(f"{path}: expired {-left:.0f} days ago: send the request again")
        return f"CN={pki.cert_common_name(cert)}, valid {left:.0f} more days", left < 30

    checks.append(_check("TLS client certificate", client_cert))

    def audit_key():
        key_path = site_dir / AUDIT_KEY
        _mode_ok(key_path)
        key = load_private_key(key_path)
        pub_path = public_key_path(key_path)
        if pub_path.exists() and public_raw_b64(load_public_key(pub_path)) != public_raw_b64(key):
            raise NodeError(f"{pub_path}: is not the public half of {key_path}")
        return "Ed25519, mode 0600", False

    checks.append(_check("audit signing key", audit_key))

    def ledger():
        path = site_dir / LEDGER_FILE
        if not path.exists():
            if (site_dir / MARKER_FILE).exists():
                raise NodeError(
                    f"{path}: missing but {MARKER_FILE} says this site trained "
                    "before; restore it from backup (the node refuses to train)"
                )
            return "not created yet (the first round creates it)", False
        from fedmeta.privacy.ledger import PrivacyLedger

        led = PrivacyLedger.read(path)
        return (
            f"{len(led.charges)} charge(s), epsilon {led.epsilon():.3f} of {led.epsilon_max:g}"
        ), False

    checks.append(_check("privacy ledger", ledger))

    def audit_log():
        path = site_dir / AUDIT_LOG
        if not path.exists():
            return "not created yet (the first round creates it)", False
        pub = public_key_path(site_dir / AUDIT_KEY)
        result = verify_log(path, public_key=pub if pub.exists() else None)
        if not result.ok:
            raise NodeError(f"{path}: {result.problem}")
        return result.summary(), False

    checks.append(_check("audit log", audit_log))

    def approvals():
        from fedmeta.approvals import approved

        found = approved(site_dir)
        if not found:
            return (
                "none: every round is declined until the DPO approves the run's "
                "declaration (`fedmeta node approve`)"
            ), True
        return ", ".join(
            f"{r.get('purpose', '?')} (sha256 {h[:12]}...)" for h, r in found.items()
        ), False

    checks.append(_check("approved run declarations", approvals))

    def apps():
        from fedmeta.deploy.appcheck import AppApprovalError, read_approvals

        try:
            found = read_approvals(site_dir)
        except AppApprovalError as exc:
            raise NodeError(str(exc)) from None
        if not found:
            return (
                "none: every run's app is refused until one is approved (`fedmeta node "
                "approve-app`)"
            ), True
        return ", ".join(
            f"{a.kind.split('_')[0]} {a.sha256[:12]}... ({a.source})" for a in found
        ), False

    checks.append(_check("approved apps", apps))

    def noise_secret():
        from fedmeta.paths import NOISE_SECRET as SECRET_FILE

        path = site_dir / SECRET_FILE
        if not path.exists():
            return "not created yet (the first round draws it from os.urandom)", False
        _mode_ok(path)
        return "32 bytes, mode 0600 (DP noise and sampling; never leaves the site)", False

    checks.append(_check("noise secret", noise_secret))

    if connect:

        def reach():
            address = superlink or node.get("superlink")
            if not address:
                raise NodeError("no SuperLink address: give --superlink HOST:PORT")
            host, port = split_address(str(address))
            try:
                if insecure:
                    with socket.create_connection((host, port), timeout=5.0):
                        pass
                    return f"{host}:{port} reachable over TCP; TLS NOT checked (--insecure)", True
                client = (site_dir / CLIENT_CERT, site_dir / TLS_KEY)
                return tls_probe(
                    host, port, ca_path, client=client if client[0].exists() else None
                ), False
            except OSError as exc:  # refused, unreachable, timeout, TLS verification failed
                raise NodeError(f"{host}:{port}: {exc}") from None

        checks.append(_check("SuperLink reachable (TLS)", reach))
    return checks
