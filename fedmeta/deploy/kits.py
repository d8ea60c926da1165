"""``fedmeta provision``: a federation CA, the SuperLink certificate and one kit per party.

Layout written under ``--out`` (``kits/``)::

    ca/                 ca.key (0600), ca.pem          -- stays with the provisioner, offline
    coordinator/        ca.pem, superlink.pem, superlink.key (0600), site-keys/<id>.pub,
                        site-audit-keys/<id>.pub.pem, federation.toml, flwr-connection.toml,
                        start-superlink.sh, register-sites.sh, README.md
    sites/<id>/         ca.pem, keys/supernode-auth.key (0600) + .pub,
                        keys/audit-signing.pem (0600) + .pub.pem, node.toml, manifest.toml,
                        start-node.sh, README.md

No private key is ever written into another party's kit. Running it again keeps
every existing key (and each kit's ``manifest.toml``) unless ``force``; files
derived from the federation file (scripts, READMEs, configs, public keys) are
rewritten. The SuperLink certificate is re-issued with its existing key when
its names changed, it was not issued by the current CA, or it expires within
:data:`RENEW_DAYS` days.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from fedmeta.audit.keys import create_key, load_private_key, public_key_path
from fedmeta.deploy import pki
from fedmeta.deploy import templates as t
from fedmeta.deploy.federation import Federation, load_federation

RENEW_DAYS = 30
CA_DIR, COORDINATOR_DIR, SITES_DIR = "ca", "coordinator", "sites"
NODE_KEY = Path("keys") / "supernode-auth.key"
NODE_PUB = Path("keys") / "supernode-auth.pub"
AUDIT_KEY = Path("keys") / "audit-signing.pem"  # = fedmeta.site.AUDIT_KEY
SCRIPT_MODE = 0o755


class ProvisionError(ValueError):
    """Provisioning cannot go on; one line naming the file."""


@dataclass
class ProvisionReport:
    """What a provisioning run did, for the CLI to print."""

    out: Path
    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


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
            raise ProvisionError(f"{cert_path}: does not belong to {key_path}; restore the "
                                 "pair from backup (or --force for a new CA and new kits)")
        report.kept.append(_rel(report, key_path))
        return key, cert
    if (key_path.exists() or cert_path.exists()) and not force:
        raise ProvisionError(f"{d}: holds only half of the CA (ca.key and ca.pem go together); "
                             "restore it from backup or use --force")
    _private_dir(d)
    key, cert = pki.create_ca(fed.name, fed.ca_validity_days)
    pki.write_private(key_path, pki.key_pem(key))
    pki.write_public(cert_path, pki.cert_pem(cert))
    report.created += [_rel(report, key_path), _rel(report, cert_path)]
    return key, cert


# ---- coordinator ---------------------------------------------------------------------
def _server_cert(fed: Federation, kit: Path, ca_key, ca_cert, force: bool,
                 report: ProvisionReport) -> None:
    key_path, cert_path = kit / "superlink.key", kit / "superlink.pem"
    key = _kept_or_new_key(key_path, force, report, pki.load_ec_private_pem, pki.new_tls_key,
                           pki.key_pem)
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
        report.notes.append(f"re-issued the SuperLink certificate ({reason}): restart the "
                            "SuperLink with the new coordinator/superlink.pem")


def _coordinator(fed: Federation, federation_file: Path, out: Path, ca_key, ca_cert,
                 force: bool, report: ProvisionReport) -> None:
    kit = out / COORDINATOR_DIR
    _private_dir(kit)
    pki.write_public(kit / "ca.pem", pki.cert_pem(ca_cert))
    _server_cert(fed, kit, ca_key, ca_cert, force, report)
    for sub, src, suffix in (("site-keys", NODE_PUB, ".pub"),
                             ("site-audit-keys", public_key_path(AUDIT_KEY), ".pub.pem")):
        d = kit / sub
        d.mkdir(exist_ok=True)
        wanted = {f"{s.id}{suffix}" for s in fed.sites}
        for old in d.iterdir():
            if old.name not in wanted:  # a removed site: its key is no longer to register
                old.unlink()
                report.notes.append(f"removed {_rel(report, old)} (site no longer listed)")
        for s in fed.sites:
            shutil.copyfile(out / SITES_DIR / s.id / src, d / f"{s.id}{suffix}")
    pki.write_public(kit / "federation.toml", federation_file.read_bytes())
    pki.write_public(kit / "flwr-connection.toml", t.render(
        t.CONNECTION_TOML, federation=fed.name, address=fed.superlink.address,
        ca_path=(kit / "ca.pem").resolve()).encode())
    common = dict(offline=t.OFFLINE_EXPORTS, secure=t.TRANSPORT_SECURE,
                  insecure=t.TRANSPORT_INSECURE, federation=fed.name)
    pki.write_public(kit / "start-superlink.sh", t.render(
        t.START_SUPERLINK, bind=fed.superlink.bind, port=fed.superlink.port, **common).encode(),
        SCRIPT_MODE)
    pki.write_public(kit / "register-sites.sh", t.render(
        t.REGISTER_SITES, site_ids=" ".join(s.id for s in fed.sites), **common).encode(),
        SCRIPT_MODE)
    pki.write_public(kit / "README.md", t.render(
        t.COORDINATOR_README, federation=fed.name, bind=fed.superlink.bind,
        port=fed.superlink.port, names=", ".join(fed.superlink.certificate_names()),
        command=t.start_superlink_command(fed.superlink.bind, fed.superlink.port)).encode())


# ---- sites ---------------------------------------------------------------------------
def _node_key(kit: Path, site_id: str, force: bool, report: ProvisionReport) -> None:
    key_path, pub_path = kit / NODE_KEY, kit / NODE_PUB
    key = _kept_or_new_key(key_path, force, report, pki.load_node_private, pki.new_node_key,
                           pki.node_private_openssh)
    pki.write_public(pub_path, pki.node_public_openssh(key, site_id))


def _audit_key(kit: Path, force: bool, report: ProvisionReport) -> None:
    path = kit / AUDIT_KEY
    if path.exists() and not force:
        load_private_key(path)  # mode 0600 and Ed25519, or KeyFileError
        report.kept.append(_rel(report, path))
        return
    if force:
        for p in (path, public_key_path(path)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    create_key(path)
    report.created.append(_rel(report, path))


def _site(fed: Federation, out: Path, site_id: str, ca_cert, force: bool,
          report: ProvisionReport) -> None:
    kit = out / SITES_DIR / site_id
    _private_dir(kit)
    _private_dir(kit / "keys")
    pki.write_public(kit / "ca.pem", pki.cert_pem(ca_cert))
    _node_key(kit, site_id, force, report)
    _audit_key(kit, force, report)
    values = dict(site_id=site_id, federation=fed.name, superlink=fed.superlink.address,
                  site_index=fed.site_index(site_id), runtime_port=fed.runtime_port(site_id))
    pki.write_public(kit / "node.toml", t.render(t.NODE_TOML, **values).encode())
    pki.write_public(kit / "start-node.sh", t.render(
        t.START_NODE, offline=t.OFFLINE_EXPORTS, secure=t.TRANSPORT_SECURE,
        insecure=t.TRANSPORT_INSECURE, **values).encode(), SCRIPT_MODE)
    pki.write_public(kit / "README.md", t.render(
        t.SITE_README, command=t.start_node_command(
            fed.superlink.address, site_id, values["site_index"], values["runtime_port"]),
        **values).encode())
    manifest = kit / "manifest.toml"
    if manifest.exists() and not force:
        report.kept.append(_rel(report, manifest))
    else:
        pki.write_public(manifest, t.manifest_template(
            site_id, fed.site(site_id).country, fed).encode())
        report.created.append(_rel(report, manifest))


def provision(federation_file: Path, out: Path, force: bool = False) -> ProvisionReport:
    """Create or update the CA, the coordinator kit and one kit per site under ``out``."""
    fed = load_federation(federation_file)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = ProvisionReport(out=out)
    ca_key, ca_cert = _ca(fed, out, force, report)
    for s in fed.sites:
        _site(fed, out, s.id, ca_cert, force, report)
    _coordinator(fed, Path(federation_file), out, ca_key, ca_cert, force, report)
    listed = {s.id for s in fed.sites}
    if (out / SITES_DIR).is_dir():
        for d in sorted((out / SITES_DIR).iterdir()):
            if d.is_dir() and d.name not in listed:
                report.notes.append(f"sites/{d.name} is no longer in the federation: "
                                    "unregister its node, then delete the kit")
    if fed.superlink.bind in ("127.0.0.1", "::1", "localhost") and fed.superlink.host not in (
            "127.0.0.1", "::1", "localhost"):
        report.notes.append(f"the SuperLink binds {fed.superlink.bind} only: sites elsewhere "
                            "cannot reach it (set superlink.bind)")
    return report
