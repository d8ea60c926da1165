"""Provisioning, kits, node init/check and the guide, without starting Flower (fast)."""

from __future__ import annotations

import argparse
import re
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from deploy_helpers import DOC, doc_block, doc_commands
from typer.testing import CliRunner

from fedmeta.cli import app
from fedmeta.deploy import pki
from fedmeta.deploy.federation import FederationError, load_federation
from fedmeta.deploy.kits import provision
from fedmeta.deploy.node import NodeError, check_site, init_site, tls_probe
from policies import evaluate_site, example_run_declaration, load_site_manifest

FED = """name = "unitfed"
[superlink]
host = "fl.example.org"
port = 9093
bind = "0.0.0.0"
sans = ["fl.example.org", "10.20.0.5"]

[[sites]]
id = "site-de-01"
country = "DE"
index = 0

[[sites]]
id = "site-in-01"
country = "in"
"""


def make(tmp: Path, text: str = FED) -> tuple[Path, Path]:
    fed = tmp / "federation.toml"
    fed.write_text(text)
    provision(fed, tmp / "kits")
    return fed, tmp / "kits"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def fill(site_dir: Path) -> None:
    p = site_dir / "manifest.toml"
    text = re.sub(r'"([A-Z]{2}): TODO[^"]*"', r'"\1: Filled In"', p.read_text())  # laws
    p.write_text(re.sub(r'"TODO[^"]*"', '"Filled In"', text)
                 .replace('dpo_contact = "Filled In"', 'dpo_contact = "dpo@x.example"'))


# ---- federation file -------------------------------------------------------------------
@pytest.mark.parametrize(("edit", "field"), [
    (lambda t: t.replace('country = "in"', 'country = "XX"'), "sites[1].country"),
    (lambda t: t.replace('id = "site-in-01"', 'id = "site-de-01"'), "sites"),
    (lambda t: t.replace('host = "fl.example.org"\n', ""), "superlink.host"),
    (lambda t: t.replace("port = 9093", "port = 70000"), "superlink.port"),
    (lambda t: t.replace("bind =", "bnd ="), "superlink.bnd"),
    (lambda t: t.replace('"10.20.0.5"', '"not a host!"'), "superlink.sans[1]"),
    (lambda t: t.replace('name = "unitfed"', 'name = "has space"'), "name"),
])
def test_federation_errors_name_file_and_field(tmp_path, edit, field):
    path = tmp_path / "fed.toml"
    path.write_text(edit(FED))
    with pytest.raises(FederationError) as exc:
        load_federation(path)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{path}: field '{field}'"), msg


def test_federation_defaults(tmp_path):
    path = tmp_path / "fed.toml"
    path.write_text(FED)
    fed = load_federation(path)
    assert fed.sites[1].country == "IN"
    assert fed.runtime_port("site-in-01") == 9095 and fed.site_index("site-in-01") == 1
    assert fed.superlink.certificate_names() == ("fl.example.org", "10.20.0.5", "127.0.0.1")
    path.write_text("name = [")
    with pytest.raises(FederationError, match="not valid TOML"):
        load_federation(path)


# ---- provisioning ----------------------------------------------------------------------
def test_kits_layout_modes_and_no_foreign_private_keys(tmp_path):
    _, kits = make(tmp_path)
    private = [p for p in kits.rglob("*") if p.is_file() and (
        p.suffix == ".key" or p.name == "audit-signing.pem")]
    assert sorted(str(p.relative_to(kits)) for p in private) == [
        "ca/ca.key", "coordinator/superlink.key",
        "sites/site-de-01/keys/audit-signing.pem", "sites/site-de-01/keys/supernode-auth.key",
        "sites/site-in-01/keys/audit-signing.pem", "sites/site-in-01/keys/supernode-auth.key"]
    assert all(mode(p) == 0o600 for p in private)
    coord = kits / "coordinator"
    assert sorted(p.name for p in (coord / "site-keys").iterdir()) == [
        "site-de-01.pub", "site-in-01.pub"]
    for script in (coord / "start-superlink.sh", coord / "register-sites.sh",
                   kits / "sites" / "site-de-01" / "start-node.sh"):
        assert mode(script) & 0o111
        assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    assert str((coord / "ca.pem").resolve()) in (coord / "flwr-connection.toml").read_text()


def test_keys_in_the_formats_flower_reads(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    _, kits = make(tmp_path)
    site = kits / "sites" / "site-de-01"
    key = load_ssh_private_key((site / "keys/supernode-auth.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    # the very functions flower-supernode and `flwr supernode register` call
    args = argparse.Namespace(auth_supernode_private_key=str(site / "keys/supernode-auth.key"),
                              auth_supernode_public_key=None)
    private, public = _try_setup_client_authentication(args)
    assert try_load_public_key(kits / "coordinator/site-keys/site-de-01.pub")
    assert pki.same_public_key(public, pki.load_node_public(site / "keys/supernode-auth.pub"))


def test_superlink_certificate(tmp_path):
    _, kits = make(tmp_path)
    ca = x509.load_pem_x509_certificate((kits / "ca/ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((kits / "coordinator/superlink.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert set(pki.cert_names(cert)) == {"fl.example.org", "10.20.0.5", "127.0.0.1"}
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (kits / "sites/site-de-01/ca.pem").read_bytes() == (kits / "ca/ca.pem").read_bytes()


def test_rerun_keeps_keys_force_replaces_them(tmp_path):
    fed, kits = make(tmp_path)
    secrets = sorted(p for p in kits.rglob("*") if p.suffix in (".key", ".pem"))
    before = {p: p.read_bytes() for p in secrets}
    manifest = kits / "sites/site-de-01/manifest.toml"
    manifest.write_text(manifest.read_text() + "# edited\n")
    provision(fed, kits)
    assert {p: p.read_bytes() for p in secrets} == before
    assert manifest.read_text().endswith("# edited\n")
    # new names: the SuperLink certificate is re-issued, with the same key
    fed.write_text(FED.replace('"10.20.0.5"', '"10.20.0.6"'))
    report = provision(fed, kits)
    assert any("re-issued" in n for n in report.notes)
    changed = {p for p in secrets if p.read_bytes() != before[p]}
    assert changed == {kits / "coordinator/superlink.pem"}
    provision(fed, kits, force=True)
    for p in (kits / "ca/ca.key", kits / "sites/site-de-01/keys/supernode-auth.key",
              kits / "sites/site-de-01/keys/audit-signing.pem"):
        assert p.read_bytes() != before[p] and mode(p) == 0o600
    assert not manifest.read_text().endswith("# edited\n")


def test_removed_site_leaves_the_coordinator_kit(tmp_path):
    fed, kits = make(tmp_path)
    fed.write_text(FED.split("\n[[sites]]\nid = \"site-in-01\"")[0])
    report = provision(fed, kits)
    assert not (kits / "coordinator/site-keys/site-in-01.pub").exists()
    assert any("site-in-01 is no longer in the federation" in n for n in report.notes)


def test_scripts_use_only_flags_the_installed_flower_has(tmp_path):
    _, kits = make(tmp_path)
    bin_dir = Path(sys.executable).parent  # the venv's flower-superlink / flower-supernode
    for script, binary in ((kits / "coordinator/start-superlink.sh", "flower-superlink"),
                           (kits / "sites/site-de-01/start-node.sh", "flower-supernode")):
        helptext = subprocess.run([str(bin_dir / binary), "--help"], capture_output=True,
                                  text=True, timeout=60).stdout
        used = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", script.read_text()))
        assert len(used) >= 6 and not sorted(f for f in used if f not in helptext)


@pytest.mark.parametrize("country", ["DE", "FR", "IN", "US"])
def test_manifest_template_passes_the_example_run_once_filled(tmp_path, country):
    _, kits = make(tmp_path, FED.replace('country = "DE"', f'country = "{country}"'))
    site = kits / "sites/site-de-01"
    fill(site)
    manifest = load_site_manifest(site / "manifest.toml")
    assert manifest.country == country
    assert not [d for d in evaluate_site(example_run_declaration(), manifest) if d.denied]


# ---- node init / check -----------------------------------------------------------------
def test_node_init_and_check(tmp_path):
    _, kits = make(tmp_path)
    site_dir = tmp_path / "state" / "site-de-01"
    report = init_site(site_dir, kits / "sites/site-de-01")
    assert "manifest.toml" in report.copied
    assert mode(site_dir / "keys/supernode-auth.key") == 0o600
    assert mode(site_dir / "keys") == 0o700 and (site_dir / "audit").is_dir()
    assert not (site_dir / "privacy-ledger.jsonl").exists()
    bad = {c.name for c in check_site(site_dir, connect=False) if not c.ok}
    assert bad == {"manifest"}  # TODO placeholders
    fill(site_dir)
    assert all(c.ok for c in check_site(site_dir, connect=False))
    # init again keeps the site's own manifest and keys
    (site_dir / "manifest.toml").write_text((site_dir / "manifest.toml").read_text() + "#\n")
    init_site(site_dir, kits / "sites/site-de-01")
    assert (site_dir / "manifest.toml").read_text().endswith("#\n")
    # rotation
    old = (site_dir / "keys/supernode-auth.pub").read_bytes()
    report = init_site(site_dir, new_auth_key=True)
    assert report.new_public_key and report.new_public_key.read_bytes() != old
    assert len(list((site_dir / "keys/retired").glob("*.key"))) == 1
    assert all(c.ok for c in check_site(site_dir, connect=False))


def test_node_check_failures(tmp_path):
    _, kits = make(tmp_path)
    site_dir = tmp_path / "s"
    init_site(site_dir, kits / "sites/site-de-01")
    fill(site_dir)
    (site_dir / "keys/supernode-auth.key").chmod(0o644)
    (site_dir / "site.json").write_text("{}")  # trained before, but the ledger is gone
    log = site_dir / "audit/audit-log.jsonl"
    from fedmeta.audit import AuditLog

    with AuditLog.open(log, site_dir / "keys/audit-signing.pem", "site-de-01") as a:
        a.append("round.train", run_id="r", round=1, decision="allow")
    log.write_text(log.read_text().replace('"round":1', '"round":2'))
    checks = {c.name: c for c in check_site(site_dir, connect=False)}
    assert "chmod 600" in checks["SuperNode key"].detail
    assert not checks["privacy ledger"].ok and "restore" in checks["privacy ledger"].detail
    assert not checks["audit log"].ok
    with pytest.raises(NodeError, match="quotes"):
        init_site(tmp_path / 'bad"dir', kits / "sites/site-de-01")


def _tls_server(cert: Path, key: Path) -> tuple[int, threading.Thread]:
    import socket

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    sock.settimeout(10)

    def serve() -> None:
        with sock:
            for _ in range(3):
                try:
                    conn, _ = sock.accept()
                except OSError:
                    return
                try:
                    with ctx.wrap_socket(conn, server_side=True):
                        pass
                except (ssl.SSLError, OSError):
                    pass
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return sock.getsockname()[1], thread


def test_tls_probe_verifies_chain_and_name(tmp_path):
    fed, kits = make(tmp_path)
    coord = kits / "coordinator"
    port, _ = _tls_server(coord / "superlink.pem", coord / "superlink.key")
    assert "TLSv1" in tls_probe("127.0.0.1", port, kits / "ca/ca.pem")
    other = tmp_path / "other"
    other.mkdir()
    make(other)  # another federation's CA
    with pytest.raises(ssl.SSLCertVerificationError, match="verify failed"):
        tls_probe("127.0.0.1", port, other / "kits/ca/ca.pem")
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch|match"):
        tls_probe("localhost", port, kits / "ca/ca.pem")  # not among the names


# ---- command line ------------------------------------------------------------------------
def test_cli_user_errors_are_one_red_line(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["provision", str(tmp_path / "nope.toml"), "--out",
                              str(tmp_path / "k")])
    assert res.exit_code == 2 and "file not found" in res.output
    _, kits = make(tmp_path)
    res = runner.invoke(app, ["node", "init", str(tmp_path / "s"), "--kit", str(tmp_path)])
    assert res.exit_code == 2 and "node.toml" in res.output
    init_site(tmp_path / "s", kits / "sites/site-de-01")
    res = runner.invoke(app, ["node", "check", str(tmp_path / "s"), "--no-connect"])
    assert res.exit_code == 1 and "TODO" in res.output
    fill(tmp_path / "s")
    res = runner.invoke(app, ["node", "check", str(tmp_path / "s"), "--no-connect"])
    assert res.exit_code == 0 and "all checks passed" in res.output


# ---- the guide -----------------------------------------------------------------------------
def test_every_documented_command_is_in_the_deployment_test():
    """Fast drift check; the slow test asserts each of them was actually run."""
    commands = doc_commands(DOC.read_text())
    assert len(commands) >= 15
    source = " ".join((Path(__file__).parent / "test_deployment.py").read_text().split())
    source = source.replace('" "', "")  # implicit string concatenation
    missing = [c for c in commands if c not in source]
    assert not missing, missing


def test_the_guides_toml_examples_are_valid():
    import tomllib

    from fedmeta.config import RunConfig
    from fedmeta.deploy.federation import parse_federation

    text = DOC.read_text()
    fed = parse_federation(tomllib.loads(doc_block(text, "toml", "federation.toml")))
    assert [s.id for s in fed.sites] == ["site-de-01", "site-in-01"]
    run = tomllib.loads(doc_block(text, "toml", "run.toml"))
    assert RunConfig.from_flat(run).dp is True
