"""``fedmeta provision``: a federation CA, the SuperLink certificate and one kit per party.

Layout written under ``--out`` (``kits/``)::

    ca/                 ca.key (0600), ca.pem          -- stays with the provisioner, offline
    requests/<id>.json  the sites' accepted requests (public keys, CSR): the registry's source
    coordinator/        ca.pem, superlink.pem, superlink.key (0600), keys/server-audit-signing.pem
                        (0600, the federation's one server audit key), site-keys/<id>.pub,
                        site-audit-keys/<id>.pub.pem, federation.toml, nginx.conf,
                        flwr-connection.toml, flwr-offline.env, start-proxy.sh,
                        start-superlink.sh, register-sites.sh, unregister-site.sh, README.md
    sites/<id>/         ca.pem, client.pem (once the site's request is accepted), node.toml,
                        manifest.toml, flwr-offline.env, start-node.sh, README.md,
                        server-audit.pub.pem (the server audit key every round is checked
                        against)

Private keys are born where they live: a site's keys are created by ``fedmeta node
init`` on the site's machine, which writes a request file with the public halves
and a CSR (:mod:`fedmeta.deploy.request`); ``provision --request FILE`` accepts it,
records the public keys in the coordinator kit and issues the site's TLS client
certificate. The provisioner never writes or holds a site's private key. Running
it again keeps every key (and each kit's ``manifest.toml``) unless ``force``; files
derived from the federation file are rewritten. The SuperLink certificate is
re-issued with its existing key when its names changed, it was not issued by the
current CA, or it expires within :data:`RENEW_DAYS` days; so is a client
certificate, from the stored request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedmeta.deploy import pki
from fedmeta.deploy import templates as t
from fedmeta.deploy.federation import Federation, load_federation
from fedmeta.deploy.proxy import nginx_conf
from fedmeta.deploy.request import SiteRequest, load_request, request_bytes
from fedmeta.paths import (
    CA_CERT,
    CLIENT_CERT,
    FEDERATION_FILE,
    KEYS_DIR,
    MANIFEST_FILE,
    SERVER_AUDIT_PUBKEY,
    SITE_AUDIT_KEYS_DIR,
    SITE_NODE_KEYS_DIR,
)
from fedmeta.paths import PINNED_SERVER_KEY as SITE_PINNED_KEY
from fedmeta.paths import SERVER_AUDIT_KEY as COORDINATOR_KEY
from fedmeta.paths import SITE_AUDIT_KEY as AUDIT_KEY

RENEW_DAYS = 30
CA_DIR, COORDINATOR_DIR, SITES_DIR, REQUESTS_DIR = "ca", "coordinator", "sites", "requests"
CLIENT_VALIDITY_DAYS = 397
SCRIPT_MODE = 0o755


class ProvisionError(ValueError):
    """Provisioning cannot go on; one line naming the file."""


# ---- kit fingerprints ----------------------------------------------------------------
SUMS = "SHA256SUMS"
FINGERPRINTS = "fingerprints.txt"
NOT_KIT = {"state", "state-insecure"}  # what a coordinator kit grows once it runs


def kit_files(kit: Path) -> list[Path]:
    return sorted(
        p
        for p in Path(kit).rglob("*")
        if p.is_file() and p.name != SUMS and not NOT_KIT & set(p.relative_to(kit).parts)
    )


def write_sums(kit: Path) -> str:
    """Write ``SHA256SUMS`` (``sha256sum -c`` format) of a kit; return the kit's fingerprint,
    the SHA-256 of that file: read it out over a second channel to check the transfer."""
    import hashlib

    lines = "".join(
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(kit).as_posix()}\n"
        for p in kit_files(kit)
    )
    pki.write_public(Path(kit) / SUMS, lines.encode())
    return hashlib.sha256(lines.encode()).hexdigest()


def verify_kit(kit: Path, fingerprint: str) -> None:
    """The kit is exactly what the provisioner fingerprinted; ProvisionError names the file."""
    import hashlib

    kit = Path(kit)
    sums = kit / SUMS
    try:
        data = sums.read_bytes()
    except FileNotFoundError:
        raise ProvisionError(f"{sums}: missing: this kit cannot be verified") from None
    if hashlib.sha256(data).hexdigest() != fingerprint.strip().lower():
        raise ProvisionError(
            f"{sums}: fingerprint {hashlib.sha256(data).hexdigest()[:16]}... "
            f"is not {fingerprint.strip()[:16]}...: the kit was altered or "
            "is another one; get it again"
        )
    listed = {}
    for line in data.decode().splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    present = {p.relative_to(kit).as_posix() for p in kit_files(kit)}
    for name in sorted(present - set(listed)):
        raise ProvisionError(f"{kit / name}: not part of the kit as provisioned: remove it")
    for name, digest in sorted(listed.items()):
        path = kit / name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise ProvisionError(
                f"{path}: missing or altered since provisioning: get the kit again"
            )


@dataclass
class ProvisionReport:
    """What a provisioning run did, for the CLI to print."""

    out: Path
    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fingerprints: dict[str, str] = field(default_factory=dict)


def _rel(report: ProvisionReport, path: Path) -> str:
    try:
        return str(path.relative_to(report.out))
    except ValueError:
        return str(path)


def _kept_or_new_key(path: Path, force: bool, report: ProvisionReport, load, new, private_bytes):
    """The private key at ``path`` (kept unless ``force``), or a new one written 0600."""
    if path.exists() and not force:
        key = load(path)
        report.kept.append(_rel(report, path))
        return key
    key = new()
    pki.write_private(path, private_bytes(key))
    report.created.append(_rel(report, path))
    return key


def _server_audit_key(out: Path, force: bool, report: ProvisionReport) -> bytes:
    """The federation's one server audit key (created once, in the coordinator kit); returns
    its public PEM, which every site kit pins."""
    from fedmeta.audit.keys import create_key, load_private_key, public_pem

    path = out / COORDINATOR_DIR / COORDINATOR_KEY
    _private_dir(path.parent)
    if path.exists() and force:
        path.unlink()
        (out / COORDINATOR_DIR / SERVER_AUDIT_PUBKEY).unlink(missing_ok=True)
    if path.exists():
        key = load_private_key(path)
        report.kept.append(_rel(report, path))
    else:
        key = create_key(path)
        report.created.append(_rel(report, path))
    return public_pem(key)


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)


# ---- CA ------------------------------------------------------------------------------
def _ca(fed: Federation, out: Path, force: bool, report: ProvisionReport):
    d = out / CA_DIR
    key_path, cert_path = d / "ca.key", d / "ca.pem"
    if key_path.exists() and cert_path.exists() and not force:
        key = pki.load_ec_private_pem(key_path)
        cert = pki.load_cert(cert_path)
        if not pki.same_public_key(cert.public_key(), key.public_key()):
            raise ProvisionError(
                f"{cert_path}: does not belong to {key_path}; restore the "
                "pair from backup (or --force for a new CA and new kits)"
            )
        report.kept.append(_rel(report, key_path))
        return key, cert
    if (key_path.exists() or cert_path.exists()) and not force:
        raise ProvisionError(
            f"{d}: holds only half of the CA (ca.key and ca.pem go together); "
            "restore it from backup or use --force"
        )
    _private_dir(d)
    key, cert = pki.create_ca(fed.name, fed.ca_validity_days)
    pki.write_private(key_path, pki.key_pem(key))
    pki.write_public(cert_path, pki.cert_pem(cert))
    report.created += [_rel(report, key_path), _rel(report, cert_path)]
    return key, cert


# ---- coordinator ---------------------------------------------------------------------
def _server_cert(
    fed: Federation, kit: Path, ca_key, ca_cert, force: bool, report: ProvisionReport
) -> None:
    key_path, cert_path = kit / "superlink.key", kit / "superlink.pem"
    key = _kept_or_new_key(
        key_path, force, report, pki.load_ec_private_pem, pki.new_tls_key, pki.key_pem
    )
    names = fed.superlink.certificate_names()
    reason = "new" if force or not cert_path.exists() else ""
    if not reason:
        cert = pki.load_cert(cert_path)
        if set(pki.cert_names(cert)) != set(names):
            reason = f"names changed ({', '.join(pki.cert_names(cert))} -> {', '.join(names)})"
        elif not pki.signed_by(cert, ca_cert):
            reason = "not issued by the current CA"
        elif not pki.same_public_key(cert.public_key(), key.public_key()):
            reason = "does not match superlink.key"
        elif pki.days_left(cert) < RENEW_DAYS:
            reason = f"expires in {pki.days_left(cert):.0f} days"
    if not reason:
        report.kept.append(_rel(report, cert_path))
        return
    cert = pki.issue_server_cert(ca_key, ca_cert, key, names, fed.server_validity_days)
    pki.write_public(cert_path, pki.cert_pem(cert))
    report.created.append(_rel(report, cert_path))
    if reason != "new":
        report.notes.append(
            f"re-issued the SuperLink certificate ({reason}): restart the "
            "SuperLink with the new coordinator/superlink.pem"
        )


def _site_public_files(
    fed: Federation, kit: Path, requests: dict[str, SiteRequest], report: ProvisionReport
) -> None:
    """coordinator/site-keys/ and site-audit-keys/ from the accepted requests, nothing else."""
    for sub, suffix, field_name in (
        (SITE_NODE_KEYS_DIR, ".pub", "supernode_public_key"),
        (SITE_AUDIT_KEYS_DIR, ".pub.pem", "audit_public_key"),
    ):
        d = kit / sub
        d.mkdir(exist_ok=True)
        wanted = {f"{s.id}{suffix}" for s in fed.sites}
        for old in d.iterdir():
            if old.name not in wanted:  # a removed site: its key is no longer to register
                old.unlink()
                report.notes.append(f"removed {_rel(report, old)} (site no longer listed)")
        for s in fed.sites:
            req = requests.get(s.id)
            if req is None:
                continue
            path = d / f"{s.id}{suffix}"
            data = (getattr(req, field_name).strip() + "\n").encode()
            if path.exists() and path.read_bytes() != data and sub == SITE_NODE_KEYS_DIR:
                report.notes.append(
                    f"site {s.id}'s SuperNode key changed: run "
                    f"./register-sites.sh CONNECTION {s.id} on the "
                    "coordinator (its old node is unregistered)"
                )
            pki.write_public(path, data)


def _coordinator(
    fed: Federation,
    federation_file: Path,
    out: Path,
    ca_key,
    ca_cert,
    force: bool,
    report: ProvisionReport,
    requests: dict[str, SiteRequest],
) -> None:
    kit = out / COORDINATOR_DIR
    _private_dir(kit)
    pki.write_public(kit / CA_CERT, pki.cert_pem(ca_cert))
    _server_cert(fed, kit, ca_key, ca_cert, force, report)
    _site_public_files(fed, kit, requests, report)
    pki.write_public(kit / FEDERATION_FILE, federation_file.read_bytes())
    pki.write_public(kit / t.ENV_FILE, t.env_file_text().encode())
    pki.write_public(kit / "nginx.conf", nginx_conf(fed).encode())
    pki.write_public(
        kit / "flwr-connection.toml",
        t.render(
            t.CONNECTION_TOML, federation=fed.name, address=fed.superlink.local_address
        ).encode(),
    )
    common = dict(
        env_file=t.ENV_FILE,
        secure=t.TRANSPORT_SECURE,
        insecure=t.TRANSPORT_INSECURE,
        federation=fed.name,
        bind=fed.superlink.bind,
        port=fed.superlink.port,
        local_port=fed.superlink.local_port,
    )
    for name, template in (
        ("start-superlink.sh", t.START_SUPERLINK),
        ("start-proxy.sh", t.START_PROXY),
        ("register-sites.sh", t.REGISTER_SITES),
        ("unregister-site.sh", t.UNREGISTER_SITE),
    ):
        pki.write_public(kit / name, t.render(template, **common).encode(), SCRIPT_MODE)
    pki.write_public(kit / "constraints.txt", t.constraints_text().encode())
    for unit, what, script, after in (
        (
            "fedmeta-superlink.service",
            f"Flower SuperLink of federation {fed.name} (fedmeta, 127.0.0.1 only)",
            "start-superlink.sh",
            "",
        ),
        (
            "fedmeta-proxy.service",
            f"nginx front of federation {fed.name} (Fleet API only, mutual TLS)",
            "start-proxy.sh",
            "fedmeta-superlink.service",
        ),
    ):
        pki.write_public(kit / "systemd" / unit, t.systemd_unit(unit, what, script, after).encode())
    pki.write_public(
        kit / "README.md",
        t.render(
            t.COORDINATOR_README,
            names=", ".join(fed.superlink.certificate_names()),
            command=t.start_superlink_command(fed.superlink.local_port),
            **common,
        ).encode(),
    )


# ---- sites ---------------------------------------------------------------------------
def _accepted_requests(
    fed: Federation, out: Path, new: list[Path], report: ProvisionReport
) -> dict[str, SiteRequest]:
    """The stored requests (``requests/<id>.json``) updated with the ``new`` ones."""
    d = out / REQUESTS_DIR
    ids = {s.id for s in fed.sites}
    accepted: dict[str, SiteRequest] = {}
    if d.is_dir():
        for path in sorted(d.glob("*.json")):
            if path.stem in ids:
                accepted[path.stem] = load_request(path, fed.name, ids)
    seen: dict[str, Path] = {}
    for path in new:
        req = load_request(path, fed.name, ids)
        if req.site_id in seen:
            raise ProvisionError(
                f"{path}: a second request for site {req.site_id} (first: "
                f"{seen[req.site_id]}): pass only the site's latest one"
            )
        seen[req.site_id] = path
        old = accepted.get(req.site_id)
        accepted[req.site_id] = req
        d.mkdir(exist_ok=True)
        pki.write_public(d / f"{req.site_id}.json", request_bytes(req))
        if old is None:
            report.created.append(f"{REQUESTS_DIR}/{req.site_id}.json (accepted {path.name})")
        elif old != req:
            report.created.append(
                f"{REQUESTS_DIR}/{req.site_id}.json (replaces the site's earlier request)"
            )
            if old.audit_public_key != req.audit_public_key:
                report.notes.append(
                    f"site {req.site_id}'s audit key changed: its new key starts a new audit log"
                )
        else:
            report.kept.append(f"{REQUESTS_DIR}/{req.site_id}.json")
    return accepted


def _client_cert(
    kit: Path, site_id: str, req: SiteRequest | None, ca_key, ca_cert, report: ProvisionReport
) -> None:
    path = kit / CLIENT_CERT
    if req is None:
        report.notes.append(
            f"site {site_id}: no request yet: the site runs `fedmeta node "
            f"init` and sends request-{site_id}.json (--request FILE)"
        )
        return
    csr = pki.load_csr(req.tls_csr.encode(), f"{REQUESTS_DIR}/{site_id}.json")
    if path.exists():
        cert = pki.load_cert(path)
        if (
            pki.signed_by(cert, ca_cert)
            and pki.days_left(cert) >= RENEW_DAYS
            and pki.same_public_key(cert.public_key(), csr.public_key())
            and pki.cert_common_name(cert) == site_id
        ):
            report.kept.append(_rel(report, path))
            return
    cert = pki.issue_client_cert(ca_key, ca_cert, csr, site_id, CLIENT_VALIDITY_DAYS)
    pki.write_public(path, pki.cert_pem(cert))
    report.created.append(_rel(report, path))


def _site(
    fed: Federation,
    out: Path,
    site_id: str,
    ca_key,
    ca_cert,
    force: bool,
    report: ProvisionReport,
    req: SiteRequest | None,
) -> None:
    kit = out / SITES_DIR / site_id
    _private_dir(kit)
    if (kit / KEYS_DIR).is_dir() and any(
        p.suffix == ".key" or p.name == AUDIT_KEY.name for p in (kit / KEYS_DIR).iterdir()
    ):
        raise ProvisionError(
            f"{kit / 'keys'}: holds a site's private keys (written by an "
            "older fedmeta): move them to the site, delete them here, and "
            "let the site send a request (fedmeta node init)"
        )
    pki.write_public(kit / CA_CERT, pki.cert_pem(ca_cert))
    pki.write_public(kit / t.ENV_FILE, t.env_file_text().encode())
    _client_cert(kit, site_id, req, ca_key, ca_cert, report)
    values = dict(
        site_id=site_id,
        federation=fed.name,
        superlink=fed.superlink.address,
        site_index=fed.site_index(site_id),
        runtime_port=fed.runtime_port(site_id),
        env_file=t.ENV_FILE,
    )
    pki.write_public(kit / "node.toml", t.render(t.NODE_TOML, **values).encode())
    pki.write_public(
        kit / "start-node.sh",
        t.render(
            t.START_NODE, secure=t.TRANSPORT_SECURE, insecure=t.TRANSPORT_INSECURE, **values
        ).encode(),
        SCRIPT_MODE,
    )
    pki.write_public(
        kit / "README.md",
        t.render(
            t.SITE_README,
            command=t.start_node_command(
                fed.superlink.address, site_id, values["site_index"], values["runtime_port"]
            ),
            **values,
        ).encode(),
    )
    pki.write_public(kit / "constraints.txt", t.constraints_text().encode())
    pki.write_public(
        kit / "systemd" / "fedmeta-node.service",
        t.systemd_unit(
            "fedmeta-node.service",
            f"fedmeta SuperNode of site {site_id} (federation {fed.name})",
            "start-node.sh",
        ).encode(),
    )
    manifest = kit / MANIFEST_FILE
    if manifest.exists() and not force:
        report.kept.append(_rel(report, manifest))
    else:
        pki.write_public(
            manifest, t.manifest_template(site_id, fed.site(site_id).country, fed).encode()
        )
        report.created.append(_rel(report, manifest))


def provision(
    federation_file: Path,
    out: Path,
    force: bool = False,
    requests: list[Path] | tuple[Path, ...] = (),
) -> ProvisionReport:
    """Create or update the CA, the coordinator kit and one kit per site under ``out``;
    accept the sites' ``requests`` (files from ``fedmeta node init``)."""
    fed = load_federation(federation_file)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = ProvisionReport(out=out)
    ca_key, ca_cert = _ca(fed, out, force, report)
    accepted = _accepted_requests(fed, out, [Path(p) for p in requests], report)
    server_pub = _server_audit_key(out, force, report)
    for s in fed.sites:
        _site(fed, out, s.id, ca_key, ca_cert, force, report, accepted.get(s.id))
        pki.write_public(out / SITES_DIR / s.id / SITE_PINNED_KEY, server_pub)
    _coordinator(fed, Path(federation_file), out, ca_key, ca_cert, force, report, accepted)
    prints = {"coordinator": write_sums(out / COORDINATOR_DIR)}
    prints.update({s.id: write_sums(out / SITES_DIR / s.id) for s in fed.sites})
    pki.write_public(
        out / FINGERPRINTS,
        "".join(f"{name} {digest}\n" for name, digest in prints.items()).encode(),
    )
    report.fingerprints = prints
    listed = {s.id for s in fed.sites}
    if (out / SITES_DIR).is_dir():
        for d in sorted((out / SITES_DIR).iterdir()):
            if d.is_dir() and d.name not in listed:
                report.notes.append(
                    f"sites/{d.name} is no longer in the federation: "
                    "unregister its node, then delete the kit"
                )
    if fed.superlink.bind in ("127.0.0.1", "::1", "localhost") and fed.superlink.host not in (
        "127.0.0.1",
        "::1",
        "localhost",
    ):
        report.notes.append(
            f"the SuperLink binds {fed.superlink.bind} only: sites elsewhere "
            "cannot reach it (set superlink.bind)"
        )
    return report
