"""A real deployment on 127.0.0.1: provisioned kits, TLS, SuperNode authentication.

One SuperLink (on loopback) behind nginx (Fleet API only, mutual TLS) and three
SuperNodes started from the kits' own scripts, with keys the sites created themselves
and sent as request files; what a site can and cannot do through the proxy (no
`flwr run`, `stop`, `log`, `supernode register/unregister`, no Runtime API, no Fleet
API without a federation certificate); two `flwr run`s of Reptile with DP (the second
loses a site after round 1), key rotation, adding and removing a site, insecure mode
asked for by name, refused nodes, and the evidence (ledgers, audit logs) verified
afterwards. Every command of docs/deploy.md is run here with its placeholders filled
in; the test fails if the guide names a command this test did not run.

Everything started here carries a unique environment tag and is stopped by PID in
the ``finally`` block; every listening socket is checked to be on loopback.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import tomllib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from deploy_helpers import (
    DOC,
    Deployment,
    copy_project,
    doc_block,
    doc_commands,
    free_ports,
    wait_for,
)

from fedmeta.audit import Receipt, verify_log
from fedmeta.deploy import pki
from fedmeta.deploy.node import tls_probe
from fedmeta.deploy.supernode import HEARTBEAT_ENV
from fedmeta.offline import OFFLINE_ENV
from fedmeta.privacy.ledger import PrivacyLedger
from policies.defaults import EXAMPLE_RUN

pytestmark = [pytest.mark.slow, pytest.mark.deploy]

FED = "testfed"
SITES = [("site-de-01", "DE"), ("site-fr-01", "FR"), ("site-in-01", "IN")]
NEW_SITE = ("site-nl-01", "NL")
LOST = "site-in-01"
ROTATED = "site-de-01"
# the guide's run.toml, made small for a test machine
OWN_HOME: dict[str, str | None] = {"FLWR_HOME": None}  # scripts default to their own
ELIGIBLE = "    eligible = {m.site_id for m in eligible_sites(decisions, list(manifests.values()))}"
HEARTBEAT_S = 10
RUN_OVERRIDES = {"eval-episodes": 3, "node-wait-s": 60.0, "round-timeout-s": 120.0}


def federation_toml(
    port: int, local_port: int, runtime: list[int], sites: list[tuple[str, str]]
) -> str:
    text = (
        f'name = "{FED}"\n\n[superlink]\nhost = "127.0.0.1"\nport = {port}\n'
        f'bind = "127.0.0.1"\nlocal_port = {local_port}\n'
        'sans = ["localhost", "127.0.0.1"]\n'
    )
    for i, (site, country) in enumerate(sites):
        text += (
            f'\n[[sites]]\nid = "{site}"\ncountry = "{country}"\nindex = {i}\n'
            f"runtime_port = {runtime[i]}\n"
        )
    return text


def fill_manifest(site_dir: Path, site: str) -> None:
    """What the site's DPO does: replace the template's TODOs."""
    path = site_dir / "manifest.toml"
    text = path.read_text()
    text = re.sub(r'institution = "TODO[^"]*"', f'institution = "Hospital {site}"', text)
    text = re.sub(r'dpo_contact = "TODO[^"]*"', f'dpo_contact = "dpo@{site}.example.org"', text)
    law = r'"\1: research provision of the hospital act (test)"'
    text = re.sub(r'"([A-Z]{2}): TODO[^"]*"', law, text)
    # these sites train on the bundled digits, which carry no collection dates: the DPO
    # says so (else every undated record is left out, as the record rules must)
    assert "collection_dates_recorded = true" in text
    text = text.replace("collection_dates_recorded = true", "collection_dates_recorded = false")
    path.write_text(text)


def write_toml(path: Path, values: dict) -> None:
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def env_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(x.decode(errors="replace").split("=", 1) for x in raw if b"=" in x)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                stat = Path(f"/proc/{p}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(p))
    return out


def metrics(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def stop(d: Deployment, name: str) -> None:
    proc = d.procs[name]
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_deployment(tmp_path: Path) -> None:
    import shutil

    assert shutil.which("nginx"), "the coordinator's proxy needs nginx: run `make nginx`"
    d = Deployment(tmp_path)
    # the nodes declare 10 s heartbeats (the SuperLink's minimum; Flower's default is 30 s):
    # a killed node is noticed after at most 20 s instead of up to 60 s
    d.env[HEARTBEAT_ENV] = str(HEARTBEAT_S)
    t0 = time.monotonic()
    try:
        _scenario(d, tmp_path)
    finally:
        t = time.monotonic()
        d.stop_all()
        leftovers = (
            d.tagged_pids()
            + [p.pid for p in d.procs.values() if p.poll() is None]
            + [
                int(p)
                for p in os.listdir("/proc")
                if p.isdigit() and str(tmp_path) in cmdline(int(p)) and "nginx" in cmdline(int(p))
            ]
        )
        d.timings["stop all"] = round(time.monotonic() - t, 1)
        (tmp_path / "timings.json").write_text(json.dumps(d.timings, indent=2))
        print("deployment timings (s):", json.dumps(d.timings))
    assert not leftovers, f"processes left running: {leftovers}"
    d.timings["total"] = round(time.monotonic() - t0, 1)
    # the guide cannot drift: every command it shows was run above
    missing = [c for c in doc_commands(DOC.read_text()) if c not in set(d.ran)]
    assert not missing, f"docs/deploy.md commands not run by this test: {missing}"


def site_secrets(site_dir: Path) -> list[bytes]:
    keys = site_dir / "keys"
    return [
        p.read_bytes().strip()
        for p in keys.rglob("*")
        if p.is_file() and (p.suffix == ".key" or p.name == "audit-signing.pem")
    ]


def registry(coord: Path) -> dict[str, str]:
    """site -> node id, from the coordinator's state/node-ids.txt."""
    lines = (coord / "state" / "node-ids.txt").read_text().splitlines()
    return {p[0]: p[1] for p in (x.split() for x in lines if x and not x.startswith("#"))}


def in_parallel(*calls: Callable[[], object]) -> list[object]:
    """Run independent steps (each a site's or a check's own) at once; re-raise the first
    failure in the test's thread."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return [f.result() for f in [pool.submit(c) for c in calls]]


# The kits directory is rewritten by every `fedmeta provision` and read by `fedmeta node
# init --kit`: the sites' inits run at once, the provisioner's commands one at a time
# between them (never while a site reads its kit).
def init_site(d: Deployment, kits: Path, site_dir: Path, site: str) -> Path:
    """A site creates its keys and request (public keys only); returns the request."""
    d.run(
        "fedmeta node init <site-dir> --kit <kit>",
        site_dir.parent,
        **{"site-dir": site_dir, "kit": kits / "sites" / site},
    )
    request = site_dir / f"request-{site}.json"
    assert b"PRIVATE" not in request.read_bytes()
    return request


def accept_request(d: Deployment, prov: Path, request: Path) -> None:
    """The provisioner accepts a site's request: its client certificate is in the kit."""
    d.run("fedmeta provision federation.toml --out kits --request <request>", prov, request=request)


def pick_up_certificate(d: Deployment, kits: Path, site_dir: Path, site: str) -> None:
    """The site picks up its client certificate from the returned kit."""
    res = d.run(
        "fedmeta node init <site-dir> --kit <kit>",
        site_dir.parent,
        **{"site-dir": site_dir, "kit": kits / "sites" / site},
    )
    assert "copied client.pem" in res.stdout, res.stdout


def init_and_request(d: Deployment, prov: Path, kits: Path, site_dir: Path, site: str) -> None:
    """One site: keys and request, accepted, certificate picked up."""
    accept_request(d, prov, init_site(d, kits, site_dir, site))
    pick_up_certificate(d, kits, site_dir, site)


def _scenario(d: Deployment, tmp: Path) -> None:
    doc = DOC.read_text()
    t = t_provision = time.monotonic()
    port, local_port, *runtime = free_ports(2 + len(SITES) + 4)
    prov = tmp / "provisioner"
    prov.mkdir()
    (prov / "federation.toml").write_text(federation_toml(port, local_port, runtime, SITES))

    # ---- 1. provision; 2. the sites create their keys and send requests ----------------------
    d.run("fedmeta provision federation.toml --out kits", prov)
    kits = prov / "kits"
    coord = kits / "coordinator"
    site_dirs = {site: tmp / "sites" / site for site, _ in SITES}
    (tmp / "sites").mkdir()

    for site, _ in SITES:
        assert not (kits / "sites" / site / "keys").exists()  # no key is born here
    # each site on its own machine: concurrently
    requests = in_parallel(*(lambda s=s: init_site(d, kits, site_dirs[s], s) for s, _ in SITES))
    for request in requests:
        accept_request(d, prov, request)

    def site_setup(site: str) -> None:
        pick_up_certificate(d, kits, site_dirs[site], site)
        res = d.run(
            "fedmeta node check <site-dir> --no-connect",
            tmp,
            expect=1,
            **{"site-dir": site_dirs[site]},
        )
        assert "TODO placeholders" in res.stdout  # the template must be filled in first
        fill_manifest(site_dirs[site], site)
        # the site's DPO accepts the run declaration the coordinator will send
        d.run(
            "fedmeta node approve <site-dir> <declaration>",
            tmp,
            **{"site-dir": site_dirs[site], "declaration": EXAMPLE_RUN},
        )

    in_parallel(*(lambda s=site: site_setup(s) for site, _ in SITES))
    # the provisioner never held a site's private key: no byte of one anywhere in its tree
    blobs = [p.read_bytes() for p in prov.rglob("*") if p.is_file()]
    for site, _ in SITES:
        secrets = site_secrets(site_dirs[site])
        assert len(secrets) == 3 and not [1 for k in secrets for b in blobs if k in b], site
    assert sorted(
        str(p.relative_to(kits))
        for p in kits.rglob("*")
        if p.is_file() and (b"PRIVATE KEY" in p.read_bytes())
    ) == ["ca/ca.key", "coordinator/keys/server-audit-signing.pem", "coordinator/superlink.key"]
    d.timings["provision+init+requests"] = round(time.monotonic() - t, 1)

    # ---- 3. insecure mode, asked for by name: own state, loopback ----------------------------
    t = time.monotonic()
    first = site_dirs[SITES[0][0]]
    link = d.start("superlink-insecure", "./start-superlink.sh --insecure", coord, env=OWN_HOME)
    wait_for(lambda: port_open(port), 60, "the insecure SuperLink")
    assert env_of(link.pid)["FEDMETA_TRANSPORT"] == "insecure"
    assert env_of(link.pid)["FLWR_DISABLE_UPDATE_CHECK"] == "1"  # sourced by the script
    node = d.start(
        "node-insecure",
        "<site-dir>/start-node.sh --insecure",
        tmp,
        env=OWN_HOME,
        **{"site-dir": first},
    )
    d.run("fedmeta node check <site-dir> --insecure", tmp, **{"site-dir": first})
    wait_for(lambda: "SuperNode ID" in d.log("node-insecure"), 60, "the insecure node")
    assert "WITHOUT TLS" in d.log("node-insecure") and "WITHOUT TLS" in d.log("superlink-insecure")
    assert env_of(node.pid)["FEDMETA_TRANSPORT"] == "insecure"
    assert (coord / "state-insecure" / "superlink.db").exists()
    assert not (coord / "state" / "superlink.db").exists()  # never the production database
    listening = d.listening()
    assert f"127.0.0.1:{port}" in listening and all(
        a.startswith("127.0.0.1:") for a in listening
    ), listening
    stop(d, "node-insecure")
    stop(d, "superlink-insecure")
    wait_for(lambda: not port_open(port), 30, "the insecure SuperLink to stop")
    d.timings["insecure"] = round(time.monotonic() - t, 1)

    # ---- 4. SuperLink on loopback, nginx in front; register the sites ------------------------
    t = time.monotonic()
    link = d.start("superlink", "./start-superlink.sh", coord, env=OWN_HOME)
    d.start("proxy", "./start-proxy.sh", coord, env=OWN_HOME)
    wait_for(lambda: port_open(local_port), 60, "the SuperLink")
    wait_for(lambda: port_open(port), 30, "the proxy")
    client = (first / "client.pem", first / "keys" / "tls-client.key")
    assert "127.0.0.1" in tls_probe("127.0.0.1", port, first / "ca.pem", client=client)
    assert env_of(link.pid)["FEDMETA_TRANSPORT"] == "tls+supernode-auth"
    assert env_of(link.pid)["FEDMETA_NODE_REGISTRY"] == str(coord / "state" / "node-ids.txt")
    wait_for(lambda: children(link.pid), 30, "the SuperLink's SuperExec")
    for child in children(link.pid):  # the ServerApp's ancestors carry it too
        assert env_of(child)["FEDMETA_TRANSPORT"] == "tls+supernode-auth"
    offline = d.source(". ./flwr-offline.env", coord)
    assert offline["FLWR_DISABLE_UPDATE_CHECK"] == "1" and offline["FLWR_TELEMETRY_ENABLED"] == "0"
    d.run('mkdir -p "${FLWR_HOME:-$HOME/.flwr}"', coord)
    d.run(
        'sed "s|@KIT@|$PWD|" flwr-connection.toml >> "${FLWR_HOME:-$HOME/.flwr}/config.toml"', coord
    )
    d.run("./register-sites.sh <federation>", coord, federation=FED)
    node_ids = registry(coord)
    assert sorted(node_ids) == sorted(s for s, _ in SITES) and all(node_ids.values())
    res = d.run("./register-sites.sh <federation>", coord, federation=FED)  # idempotent
    assert res.stdout.count("already registered") == len(SITES) and registry(coord) == node_ids
    res = d.run("fedmeta node check <site-dir>", tmp, **{"site-dir": first})
    assert "all checks passed" in res.stdout and "TLSv1" in res.stdout

    # refused: a key nobody registered (with a valid client certificate), a node that does
    # not trust the federation CA, and a stock flower-supernode (no client certificate)
    rogue = pki.new_node_key()
    pki.write_private(tmp / "rogue.key", pki.node_private_openssh(rogue))
    pki.write_public(tmp / "rogue.pub", pki.node_public_openssh(rogue))
    site0_key = first / "keys" / "supernode-auth.key"
    with_cert = {
        "FEDMETA_TLS_CLIENT_CERT": str(client[0]),
        "FEDMETA_TLS_CLIENT_KEY": str(client[1]),
    }
    unregistered = d.start(
        "node-unregistered",
        "fedmeta node supernode --superlink 127.0.0.1:<port> "
        "--root-certificates <ca> --auth-supernode-private-key <key> --port <rport>",
        tmp,
        record=False,
        env={"FLWR_HOME": str(tmp / "rogue-home"), **with_cert},
        port=port,
        ca=coord / "ca.pem",
        key=tmp / "rogue.key",
        rport=runtime[-1],
    )
    no_ca = d.start(
        "node-no-ca",
        "fedmeta node supernode --superlink 127.0.0.1:<port> "
        "--auth-supernode-private-key <key> --port <rport>",
        tmp,
        record=False,
        env={"FLWR_HOME": str(tmp / "no-ca-home"), **with_cert},
        port=port,
        key=site0_key,
        rport=runtime[-2],
    )
    no_cert = d.start(
        "node-no-client-cert",
        "flower-supernode --superlink 127.0.0.1:<port> "
        "--root-certificates <ca> --auth-supernode-private-key <key> --port <rport>",
        tmp,
        record=False,
        env={"FLWR_HOME": str(tmp / "no-cert-home"), **OFFLINE_ENV},
        port=port,
        ca=coord / "ca.pem",
        key=site0_key,
        rport=runtime[-4],
    )

    # ---- 5. the three sites start their nodes ----------------------------------------------
    for site, _ in SITES:
        d.start(
            f"node-{site}",
            "<site-dir>/start-node.sh",
            tmp,
            env=OWN_HOME,
            **{"site-dir": site_dirs[site]},
        )

    def nodes_online() -> None:
        for site, _ in SITES:  # logged once the SuperLink accepted the node
            wait_for(
                lambda s=site: f"SuperNode ID: {node_ids[s]}" in d.log(f"node-{s}"),
                90,
                f"{site} online",
            )
        d.run("flwr supernode ls <federation>", coord, federation=FED)
        wait_for(lambda: unregistered.poll() is not None, 60, "the unregistered node")
        assert unregistered.returncode != 0
        assert "2004" in d.log("node-unregistered"), d.log("node-unregistered")[-2000:]
        wait_for(lambda: no_ca.poll() is not None, 60, "the node without the CA")
        assert no_ca.returncode != 0
        assert "CERTIFICATE_VERIFY_FAILED" in d.log("node-no-ca"), d.log("node-no-ca")[-2000:]
        wait_for(lambda: no_cert.poll() is not None, 60, "the node without a client certificate")
        assert no_cert.returncode != 0 and "400 Bad Request" in d.log("node-no-client-cert"), d.log(
            "node-no-client-cert"
        )[-2000:]

    # ---- 5b. meanwhile, what a site can do through the proxy: nothing but the Fleet API -----
    app = copy_project(
        tmp / "app", {**tomllib.loads(doc_block(doc, "toml", "run.toml")), **RUN_OVERRIDES}
    )
    in_parallel(nodes_online, lambda: site_attacks(d, tmp, app, coord, port, first, node_ids))
    for site, _ in SITES:  # inherited by the node's SuperExec, hence by every ClientApp
        node_pid = d.procs[f"node-{site}"].pid
        assert env_of(node_pid)["FEDMETA_TRANSPORT"] == "tls+supernode-auth"
        assert env_of(node_pid)["FLWR_DISABLE_UPDATE_CHECK"] == "1"
        assert all(
            env_of(c)["FEDMETA_TRANSPORT"] == "tls+supernode-auth" for c in children(node_pid)
        )
    addresses = d.listening()
    assert addresses and all(a.startswith(("127.0.0.1:", "::1:")) for a in addresses), addresses
    assert f"127.0.0.1:{local_port}" in addresses and f"127.0.0.1:{port}" in addresses
    assert registry(coord) == node_ids
    assert sorted(
        str(n["node-id"]) for n in d.flwr_nodes(FED) if n["status"] == "online"
    ) == sorted(node_ids.values())
    d.timings["superlink+proxy+register+nodes (and the sites' attempts)"] = round(
        time.monotonic() - t, 1
    )

    # ---- 6. run A: two rounds of Reptile with DP, all three sites --------------------------
    run_cfg = tomllib.loads(doc_block(doc, "toml", "run.toml"))
    assert run_cfg["out-dir"].endswith("/{run}")  # the guide's: one directory per run
    runs_a = tmp / "runs-a"
    write_toml(app / "run.toml", {**run_cfg, **RUN_OVERRIDES, "out-dir": str(runs_a / "{run}")})
    t = time.monotonic()
    d.source(". <coordinator-kit>/flwr-offline.env", app, **{"coordinator-kit": coord})
    res = d.run(
        "flwr run . <federation> --stream --run-config run.toml", app, timeout=400, federation=FED
    )
    out_a = wait_for(
        lambda: next(iter(runs_a.glob("*/summary.json")), None), 60, "run A's summary"
    ).parent
    run_a = json.loads((out_a / "summary.json").read_text())["run"]
    assert out_a.name == run_a
    d.timings["two-round deployed run (flwr run wall)"] = round(time.monotonic() - t, 1)
    d.run("fedmeta audit verify <out-dir>/audit/server-audit-log.jsonl", tmp, **{"out-dir": out_a})
    d.timings["provisioning to a verified run (3 sites)"] = round(time.monotonic() - t_provision, 1)
    summary = json.loads((out_a / "summary.json").read_text())
    d.timings["two-round deployed run (server wall_s)"] = summary["wall_s"]
    assert summary["sites"] == sorted(s for s, _ in SITES), summary
    assert summary["dp"] is True and not summary["stopped"] and summary["eval"]
    rounds_a = [m for m in metrics(out_a) if m["round"] > 0]
    assert [m["round"] for m in rounds_a] == [1, 2]
    for m in rounds_a:
        assert m["used"] == sorted(s for s, _ in SITES) and not m["lost"], m
    assert not [
        x
        for x in (out_a / "audit" / "server-audit-log.jsonl").read_text().splitlines()
        if '"site.unusable"' in x
    ]  # every node bound to its site by the registry
    receipts = {site: [Receipt.parse(m["receipts"][site]) for m in rounds_a] for site, _ in SITES}

    # ---- 6b. a coordinator that turns DP off: every site declines, nothing is charged -------
    # (its own server skips the run-level rules, which would stop it there: PRIV-DP)
    t = time.monotonic()
    hostile = copy_project(tmp / "hostile-app", {**run_cfg, **RUN_OVERRIDES})
    run_py = hostile / "server" / "run.py"
    text = run_py.read_text()
    assert ELIGIBLE in text
    run_py.write_text(text.replace(ELIGIBLE, "    eligible = set(manifests)"))
    out_h = tmp / "server-hostile"
    charges = {
        site: len(PrivacyLedger.read(site_dirs[site] / "privacy-ledger.jsonl").charges)
        for site, _ in SITES
    }
    # flwr takes a TOML file or key=value pairs, not both: dp = false goes in the file
    write_toml(
        hostile / "run.toml",
        {**run_cfg, **RUN_OVERRIDES, "rounds": 1, "dp": False, "out-dir": str(out_h)},
    )
    res = d.run(
        "fedmeta run . <federation> --run-config run.toml",
        hostile,
        timeout=400,
        expect=1,
        federation=FED,
    )  # refused by every site: a non-zero exit
    assert "fedmeta: round 1/1: used 0, declined 3" in res.stdout, res.stdout[-2000:]
    assert "refused" in res.stderr, res.stderr[-2000:]
    wait_for(lambda: (out_h / "summary.json").exists(), 60, "the dp=false run's summary")
    (hostile_round,) = [m for m in metrics(out_h) if m["round"] > 0]
    assert not hostile_round["used"], hostile_round
    assert sorted(hostile_round["declined"]) == sorted(s for s, _ in SITES), hostile_round
    assert all("dp_required" in r for r in hostile_round["declined"].values())
    for site, _ in SITES:
        log = site_dirs[site] / "audit" / "audit-log.jsonl"
        entries = [json.loads(x) for x in log.read_text().splitlines()]
        mine = [e for e in entries if e["run_id"] == hostile_round["run"]]
        deny = [e for e in mine if e["decision"] == "deny"]
        assert [e["rule_ids"] for e in deny] == [["SITE-POLICY.dp_required"]], deny
        assert deny[0]["action"] == "privacy.decline"
        assert not any(e["action"] == "round.train" for e in mine)
        ledger = PrivacyLedger.read(site_dirs[site] / "privacy-ledger.jsonl")
        assert len(ledger.charges) == charges[site]  # nothing charged
        assert verify_log(log, public_key=coord / "site-audit-keys" / f"{site}.pub.pem").ok
    d.timings["dp=false run declined by every site"] = round(time.monotonic() - t, 1)

    # ---- 7. run B: a site is lost after round 1; the run finishes with the other two -------
    out_b = tmp / "server-b"
    write_toml(app / "run.toml", {**run_cfg, **RUN_OVERRIDES, "out-dir": str(out_b)})
    t = time.monotonic()
    run_b = d.start(
        "flwr-run-b",
        "fedmeta run . <federation> --run-config run.toml",
        app,
        record=False,
        federation=FED,
    )
    wait_for(
        lambda: any(m["round"] == 1 for m in metrics(out_b)), 300, "run B's round 1", every=0.2
    )
    # the ServerApp's process shows how it reaches the SuperLink: TLS, never --insecure
    serverapp = [cmdline(p) for p in d.tagged_pids() if "flwr-serverapp" in cmdline(p)]
    assert serverapp and all(
        "--root-certificates" in c and "--insecure" not in c for c in serverapp
    ), serverapp
    node_pid = d.procs[f"node-{LOST}"].pid
    # kill it while it trains round 2 (a ClientApp process below it), not between rounds
    import psutil

    def training() -> list[psutil.Process]:
        try:
            return [
                c
                for c in psutil.Process(node_pid).children(recursive=True)
                if "lifeline clientapp" in " ".join(c.cmdline())
            ]  # flwr-clientapp
        except psutil.Error:
            return []

    def alive(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    below = wait_for(training, 120, f"{LOST}'s round-2 ClientApp", every=0.1)
    d.procs[f"node-{LOST}"].send_signal(signal.SIGKILL)  # a crash, not a goodbye
    wait_for(
        lambda: not [p for p in below if alive(p)],
        10,
        f"no training process of the killed node {LOST} left",
        every=0.2,
    )
    t_kill = t_add = time.monotonic()  # meanwhile (the SuperLink notices the loss after
    # two missed heartbeats, at most 2 * HEARTBEAT_S):
    add_and_remove_site(d, prov, tmp, port, local_port, runtime)
    d.timings["add+remove site (during run B)"] = round(time.monotonic() - t_add, 1)
    wait_for(lambda: run_b.poll() is not None, 400, "run B to finish", every=0.5)
    d.timings["run B: kill to finish"] = round(time.monotonic() - t_kill, 1)
    assert run_b.returncode == 0, d.log("flwr-run-b")[-3000:]
    assert f"lost 1 ({LOST}: " in d.log("flwr-run-b"), d.log("flwr-run-b")[-3000:]
    wait_for(lambda: (out_b / "summary.json").exists(), 60, "run B's summary")
    d.timings["run with a lost site"] = round(time.monotonic() - t, 1)
    rounds_b = {m["round"]: m for m in metrics(out_b) if m["round"] > 0}
    assert rounds_b[1]["used"] == sorted(s for s, _ in SITES)
    # noticed by the SuperLink (the node's heartbeats stopped), not by the round timeout
    assert rounds_b[2]["lost"][LOST].startswith("error "), rounds_b[2]
    assert rounds_b[2]["used"] == sorted(s for s, _ in SITES if s != LOST), rounds_b[2]
    assert not json.loads((out_b / "summary.json").read_text())["stopped"]
    ends = [
        json.loads(x)
        for x in (out_b / "audit" / "server-audit-log.jsonl").read_text().splitlines()
        if '"round.end"' in x
    ]  # the signed log names the lost site, why
    assert any(e["round"] == 2 and e["details"].get(f"lost:{LOST}") for e in ends), ends

    # ---- 8. the evidence: server and site logs, ledgers --------------------------------------
    for out in (out_a, out_b):
        d.run(
            "fedmeta audit verify <out-dir>/audit/server-audit-log.jsonl", tmp, **{"out-dir": out}
        )
    # the transport the start scripts declared is on record at both ends
    start = next(
        json.loads(x)
        for x in (out_a / "audit" / "server-audit-log.jsonl").read_text().splitlines()
        if json.loads(x)["action"] == "run.start"
    )
    assert start["details"]["transport"] == "tls+supernode-auth", start["details"]
    assert start["details"]["serverapp_tls"] is True
    for site, _ in SITES:
        trains = [
            json.loads(x)
            for x in (site_dirs[site] / "audit" / "audit-log.jsonl").read_text().splitlines()
            if '"round.train"' in x
        ]
        assert trains and all(e["details"]["transport"] == "tls+supernode-auth" for e in trains), (
            site
        )
    for site, _ in SITES:
        ledger = PrivacyLedger.read(site_dirs[site] / "privacy-ledger.jsonl")
        # the lost site trained in run B's round 1, maybe started round 2 before the crash
        assert len(ledger.charges) in ((3, 4) if site == LOST else (4,)), site
        assert 0 < ledger.epsilon() <= ledger.epsilon_max
        result = verify_log(
            site_dirs[site] / "audit" / "audit-log.jsonl",
            public_key=coord / "site-audit-keys" / f"{site}.pub.pem",
            receipts=receipts[site],
        )
        assert result.ok and all(good for _, good in result.receipts_checked), result.summary()
    d.run("fedmeta ledger show <site-dir>", tmp, **{"site-dir": first})
    d.run(
        "fedmeta audit verify <site-dir>/audit/audit-log.jsonl --public-key "
        "<site-dir>/keys/audit-signing.pub.pem",
        tmp,
        **{"site-dir": first},
    )
    res = d.run("fedmeta node check <site-dir>", tmp, **{"site-dir": first})
    assert "charge(s)" in res.stdout

    # ---- 8b. one server key; the sites' evidence; the coordinator's and a site's report ------
    t = time.monotonic()
    server_pub = coord / "keys" / "server-audit-signing.pub.pem"
    for out in (out_a, out_b):  # signed with the federation's key, pinned at every site
        assert verify_log(out / "audit" / "server-audit-log.jsonl", public_key=server_pub).ok
    for site, _ in SITES:
        records = [
            json.loads(x)
            for x in (site_dirs[site] / "audit" / "audit-log.jsonl").read_text().splitlines()
            if '"run.record"' in x
        ]
        kept = [e for e in records if e["run_id"] == run_a]
        assert [(e["decision"], e["details"]["server_key"]) for e in kept] == [
            ("allow", "pinned")
        ], records

    def export(site: str) -> Path:
        res = d.run(
            "fedmeta node export-evidence <site-dir> --run <run-id>",
            tmp,
            **{"site-dir": site_dirs[site], "run-id": run_a},
        )
        evidence = site_dirs[site] / "exports" / f"evidence-{site}-{run_a}.json"
        assert evidence.is_file() and "sha256" in res.stdout
        return evidence

    evidence = {first.name: export(first.name)}  # before the site's own report, below

    def coordinator_report() -> None:
        others = [s for s, _ in SITES if s not in evidence]  # each site on its own machine
        evidence.update(
            zip(others, in_parallel(*(lambda s=s: export(s) for s in others)), strict=True)
        )
        res = d.run(  # the files the sites sent, in one import
            "fedmeta evidence import <out-dir> <evidence> --keys <coordinator-kit>/site-audit-keys",
            tmp,
            **{
                "out-dir": out_a,
                "evidence": [evidence[s] for s, _ in SITES],
                "coordinator-kit": coord,
            },
        )
        assert all(f"imported {s}:" in res.stdout for s, _ in SITES), res.stdout
        res = d.run(
            "fedmeta report <out-dir> --trust <coordinator-kit>/site-audit-keys "
            "--trust <coordinator-kit>/keys/server-audit-signing.pub.pem",
            tmp,
            timeout=180,
            **{"out-dir": out_a, "coordinator-kit": coord},
        )
        assert "wrote" in res.stdout and "warning" not in res.stderr
        assert "note:" not in res.stderr
        assert (out_a / "report.html").is_file()

    def site_report() -> None:  # the site's, from its own files: meanwhile
        res = d.run(
            "fedmeta report --site-dir <site-dir> --run <run-id>",
            tmp,
            timeout=180,
            **{"site-dir": first, "run-id": run_a},
        )
        assert "warning" not in res.stderr and "note:" not in res.stderr, res.stderr
        assert (first / "runs" / run_a / f"report-{first.name}.html").is_file()

    in_parallel(coordinator_report, site_report)
    d.timings["evidence export/import + both reports"] = round(time.monotonic() - t, 1)
    d.timings["provisioning to both reports verified (3 sites, runs A, dp=false, B)"] = round(
        time.monotonic() - t_provision, 1
    )

    # ---- 9. rotate site-de-01's SuperNode key ----------------------------------------------
    t = time.monotonic()
    rot = site_dirs[ROTATED]
    old_pub = (rot / "keys" / "supernode-auth.pub").read_bytes()
    d.run("fedmeta node init <site-dir> --new-auth-key", tmp, **{"site-dir": rot})
    assert (rot / "keys" / "supernode-auth.pub").read_bytes() != old_pub
    d.run(
        "fedmeta provision federation.toml --out kits --request <request>",
        prov,
        request=rot / f"request-{ROTATED}.json",
    )
    res = d.run(
        "./register-sites.sh <federation> <site-id>",
        coord,
        **{"federation": FED, "site-id": ROTATED},
    )
    new_id = registry(coord)[ROTATED]
    assert new_id != node_ids[ROTATED] and f"former node {node_ids[ROTATED]}" in res.stdout
    stop(d, f"node-{ROTATED}")
    d.start(
        f"node-{ROTATED}-rotated",
        "<site-dir>/start-node.sh",
        tmp,
        env=OWN_HOME,
        **{"site-dir": rot},
    )
    # meanwhile, the old key (unregistered above) tries to come back
    retired = next((rot / "keys" / "retired").glob("*.key"))
    old = d.start(
        "node-retired-key",
        "fedmeta node supernode --superlink 127.0.0.1:<port> "
        "--root-certificates <ca> --auth-supernode-private-key <key> --port <rport>",
        tmp,
        record=False,
        env={
            "FLWR_HOME": str(tmp / "retired-home"),
            "FEDMETA_TLS_CLIENT_CERT": str(rot / "client.pem"),
            "FEDMETA_TLS_CLIENT_KEY": str(rot / "keys" / "tls-client.key"),
        },
        port=port,
        ca=coord / "ca.pem",
        key=retired,
        rport=runtime[-3],
    )
    wait_for(
        lambda: f"SuperNode ID: {new_id}" in d.log(f"node-{ROTATED}-rotated"),
        90,
        "the rotated node online",
    )
    nodes = d.flwr_nodes(FED)
    assert any(n["node-id"] == new_id and n["status"] == "online" for n in nodes)
    assert not any(
        str(n["node-id"]) == node_ids[ROTATED] and n["status"] != "unregistered" for n in nodes
    ), nodes  # the old node was unregistered
    wait_for(lambda: old.poll() is not None, 60, "the retired key's node")
    assert old.returncode != 0 and "2004" in d.log("node-retired-key")
    d.timings["rotate"] = round(time.monotonic() - t, 1)


CONTROL_AND_RUNTIME = [
    "/v1/control/start-run",
    "/v1/control/stop-run",
    "/v1/control/register-node",
    "/v1/control/unregister-node",
    "/v1/control/stream-logs",
    "/v1/control/list-runs",
    "/v1/control/list-nodes",
    "/v1/runtime/acquire-task",
    "/v1/runtime/get-nodes",
    "/v1/runtime/pull-messages",
    "/v1/fleet/../control/list-runs",
    "/v1/fleet/%2e%2e/control/list-runs",
    "/v1/fleet/..%2fcontrol/list-runs",
    "//v1/control/list-runs",
    "/v1/fleet/../runtime/acquire-task",
]


def site_attacks(
    d: Deployment,
    tmp: Path,
    app: Path,
    coord: Path,
    port: int,
    site_dir: Path,
    node_ids: dict[str, str],
) -> None:
    """A site (its kit, its keys, its client certificate, Flower's CLI) against the proxy."""
    other_site = next(s for s in node_ids if s != site_dir.name)
    attempts = {
        "flwr run": ["run", ".", "attack", "--run-config", "run.toml"],
        "flwr stop": ["stop", "1", "attack"],
        "flwr log": ["log", "1", "attack", "--show"],
        "flwr ls": ["ls", "attack"],
        "flwr supernode register": [
            "supernode",
            "register",
            str(tmp / "rogue.pub"),
            "attack",
            "--name",
            other_site,
        ],
        "flwr supernode unregister": ["supernode", "unregister", node_ids[other_site], "attack"],
    }
    write_toml(app / "run.toml", {"out-dir": str(tmp / "attack-out")})

    def attempt(i: int, what: str, args: list[str]) -> None:
        home = tmp / f"site-attacker-home-{i}"  # one each: the attempts run at once
        home.mkdir()
        (home / "config.toml").write_text(
            f'[superlink.attack]\naddress = "127.0.0.1:{port}"\n'
            f'root-certificates = "{site_dir / "ca.pem"}"\n'
        )
        res = subprocess.run(
            ["flwr", *args],
            cwd=app,
            env={**d.offline, "FLWR_HOME": str(home)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode != 0, f"{what} from a site succeeded: {res.stdout[-1500:]}"

    in_parallel(
        *(lambda i=i, w=w, a=a: attempt(i, w, a) for i, (w, a) in enumerate(attempts.items()))
    )
    assert not (tmp / "attack-out").exists()
    # with the site's own client certificate, straight at the proxy: only /v1/fleet/ exists
    cert = (str(site_dir / "client.pem"), str(site_dir / "keys" / "tls-client.key"))
    import ssl

    ctx = ssl.create_default_context(cafile=str(site_dir / "ca.pem"))
    ctx.load_cert_chain(*cert)
    base = f"https://127.0.0.1:{port}"
    with httpx.Client(verify=ctx, timeout=30) as client:
        for path in CONTROL_AND_RUNTIME:
            res = client.post(
                base + path, content=b"", headers={"content-type": "application/protobuf"}
            )
            assert res.status_code == 404, (path, res.status_code, res.text[:300])
        assert client.get(base + "/v1/fleet/pull-messages").status_code == 403
        # the Fleet API's self-registration is off: a client certificate is not a node
        res = client.post(
            base + "/v1/fleet/register-node",
            content=b"",
            headers={"content-type": "application/protobuf"},
        )
        assert res.status_code >= 400, res.status_code
    # without a certificate of the federation CA: no Fleet API
    bare = ssl.create_default_context(cafile=str(site_dir / "ca.pem"))
    foreign = tmp / "foreign"
    foreign.mkdir()
    ca_key, ca_cert = pki.create_ca("foreign", 30)
    key = pki.new_tls_key()
    req = pki.load_csr(
        pki.site_csr(key, site_dir.name).public_bytes(pki.serialization.Encoding.PEM), "foreign"
    )
    pki.write_private(foreign / "c.key", pki.key_pem(key))
    pki.write_public(
        foreign / "c.pem",
        pki.cert_pem(pki.issue_client_cert(ca_key, ca_cert, req, site_dir.name, 30)),
    )
    other = ssl.create_default_context(cafile=str(site_dir / "ca.pem"))
    other.load_cert_chain(str(foreign / "c.pem"), str(foreign / "c.key"))
    for ctx_ in (bare, other):
        with httpx.Client(verify=ctx_, timeout=30) as client:
            try:
                status = client.post(base + "/v1/fleet/pull-messages", content=b"").status_code
            except httpx.HTTPError:
                status = 0  # the handshake itself refused
            assert status in (0, 400), status
    log = (coord / "state" / "nginx" / "access.log").read_text()
    control = [x for x in log.splitlines() if "/v1/control/" in x or "/v1/runtime/" in x]
    assert control and not [x for x in control if '" 200 ' in x], control[:5]


def add_and_remove_site(
    d: Deployment, prov: Path, tmp: Path, port: int, local_port: int, runtime: list[int]
) -> None:
    """Coordinator: add a site to the federation (keys of the others kept), the site makes
    its keys and request, register it; then remove it again (unregister its node)."""
    kits = prov / "kits"
    coord = kits / "coordinator"
    before = {p: p.read_bytes() for p in kits.rglob("*") if p.is_file() and p.suffix == ".key"}
    (prov / "federation.toml").write_text(
        federation_toml(port, local_port, runtime, [*SITES, NEW_SITE])
    )
    d.run("fedmeta provision federation.toml --out kits", prov)
    assert all(p.read_bytes() == data for p, data in before.items()), "a key was replaced"
    site_dir = tmp / "sites" / NEW_SITE[0]
    init_and_request(d, prov, kits, site_dir, NEW_SITE[0])
    assert (coord / "site-keys" / f"{NEW_SITE[0]}.pub").exists()
    d.run(
        "./register-sites.sh <federation> <site-id>",
        coord,
        federation=FED,
        **{"site-id": NEW_SITE[0]},
    )
    node = registry(coord)[NEW_SITE[0]]
    assert node.isdigit()
    d.run(
        "./unregister-site.sh <federation> <site-id>",
        coord,
        **{"site-id": NEW_SITE[0], "federation": FED},
    )
    assert NEW_SITE[0] not in registry(coord)
    assert not any(
        str(n["node-id"]) == node and n["status"] != "unregistered" for n in d.flwr_nodes(FED)
    )
    # unregistering it again fails loudly
    res = subprocess.run(
        [str(coord / "unregister-site.sh"), FED, NEW_SITE[0]],
        cwd=coord,
        env=d.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1 and "not in" in res.stderr
