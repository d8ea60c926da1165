"""A real deployment on 127.0.0.1: provisioned kits, TLS, SuperNode authentication.

One SuperLink and three SuperNodes started from the kits' own scripts, two
`flwr run`s of Reptile with DP (the second loses a site after round 1), key
rotation, adding and removing a site, insecure mode asked for by name, refused
nodes, and the evidence (ledgers, audit logs) verified afterwards. Every command
of docs/deploy.md is run here with its placeholders filled in; the test fails if
the guide names a command this test did not run.

Everything started here carries a unique environment tag and is stopped by PID in
the ``finally`` block; every listening socket is checked to be on loopback.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
import tomllib
from pathlib import Path

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
RUN_OVERRIDES = {"eval-episodes": 3, "node-wait-s": 60.0, "round-timeout-s": 120.0}


def federation_toml(port: int, runtime: list[int], sites: list[tuple[str, str]]) -> str:
    text = (f'name = "{FED}"\n\n[superlink]\nhost = "127.0.0.1"\nport = {port}\n'
            'bind = "127.0.0.1"\nsans = ["localhost", "127.0.0.1"]\n')
    for i, (site, country) in enumerate(sites):
        text += (f'\n[[sites]]\nid = "{site}"\ncountry = "{country}"\nindex = {i}\n'
                 f"runtime_port = {runtime[i]}\n")
    return text


def fill_manifest(site_dir: Path, site: str) -> None:
    """What the site's DPO does: replace the template's TODOs."""
    path = site_dir / "manifest.toml"
    text = path.read_text()
    text = re.sub(r'institution = "TODO[^"]*"', f'institution = "Hospital {site}"', text)
    text = re.sub(r'dpo_contact = "TODO[^"]*"', f'dpo_contact = "dpo@{site}.example.org"', text)
    law = r'"\1: research provision of the hospital act (test)"'
    text = re.sub(r'"([A-Z]{2}): TODO[^"]*"', law, text)
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
    d = Deployment(tmp_path)
    t0 = time.monotonic()
    try:
        _scenario(d, tmp_path)
    finally:
        t = time.monotonic()
        d.stop_all()
        leftovers = d.tagged_pids()
        d.timings["stop all"] = round(time.monotonic() - t, 1)
        (tmp_path / "timings.json").write_text(json.dumps(d.timings, indent=2))
        print("deployment timings (s):", json.dumps(d.timings))
    assert not leftovers, f"processes left running: {leftovers}"
    d.timings["total"] = round(time.monotonic() - t0, 1)
    # the guide cannot drift: every command it shows was run above
    missing = [c for c in doc_commands(DOC.read_text()) if c not in set(d.ran)]
    assert not missing, f"docs/deploy.md commands not run by this test: {missing}"


def _scenario(d: Deployment, tmp: Path) -> None:
    doc = DOC.read_text()
    t = time.monotonic()
    port, *runtime = free_ports(1 + len(SITES) + 4)
    prov = tmp / "provisioner"
    prov.mkdir()
    (prov / "federation.toml").write_text(federation_toml(port, runtime, SITES))

    # ---- 1. provision ----------------------------------------------------------------
    d.run("fedmeta provision federation.toml --out kits", prov)
    kits = prov / "kits"
    coord = kits / "coordinator"
    for path in kits.rglob("*"):
        secret = path.suffix == ".key" or path.name in ("audit-signing.pem",)
        if secret:
            assert oct(path.stat().st_mode & 0o777) == "0o600", path
        if path.name == "ca.key":
            assert path.parent == kits / "ca", f"CA key inside a kit: {path}"
    for site, _ in SITES:  # no other party's private key in a site kit
        private = {p.name for p in (kits / "sites" / site).rglob("*")
                   if p.suffix == ".key" or p.name == "audit-signing.pem"}
        assert private == {"supernode-auth.key", "audit-signing.pem"}
    assert not [p for p in coord.rglob("*") if p.suffix == ".key" and p.name != "superlink.key"]

    # ---- 2. the sites lay out their directories -----------------------------------------
    site_dirs = {site: tmp / site for site, _ in SITES}
    for site, _ in SITES:
        d.run("fedmeta node init <site-dir> --kit <kit>", tmp, **{
            "site-dir": site_dirs[site], "kit": kits / "sites" / site})
        res = d.run("fedmeta node check <site-dir> --no-connect", tmp, expect=1,
                    **{"site-dir": site_dirs[site]})
        assert "TODO placeholders" in res.stdout  # the template must be filled in first
        fill_manifest(site_dirs[site], site)
        # the site's DPO accepts the run declaration the coordinator will send
        d.run("fedmeta node approve <site-dir> <declaration>", tmp, **{
            "site-dir": site_dirs[site], "declaration": EXAMPLE_RUN})
    d.timings["provision+init"] = round(time.monotonic() - t, 1)

    # ---- 3. insecure mode, asked for by name ----------------------------------------------
    t = time.monotonic()
    first = site_dirs[SITES[0][0]]
    link = d.start("superlink-insecure", "./start-superlink.sh --insecure", coord,
                   env={"SUPERLINK_STATE": str(tmp / "insecure-state"), **OWN_HOME})
    wait_for(lambda: port_open(port), 60, "the insecure SuperLink")
    assert env_of(link.pid)["FEDMETA_TRANSPORT"] == "insecure"
    node = d.start("node-insecure", "<site-dir>/start-node.sh --insecure", tmp,
                   env=OWN_HOME, **{"site-dir": first})
    d.run("fedmeta node check <site-dir> --insecure", tmp, **{"site-dir": first})
    wait_for(lambda: "SuperNode ID" in d.log("node-insecure"), 60, "the insecure node")
    assert "WITHOUT TLS" in d.log("node-insecure") and "WITHOUT TLS" in d.log(
        "superlink-insecure")
    assert env_of(node.pid)["FEDMETA_TRANSPORT"] == "insecure"
    stop(d, "node-insecure")
    stop(d, "superlink-insecure")
    wait_for(lambda: not port_open(port), 30, "the insecure SuperLink to stop")
    d.timings["insecure"] = round(time.monotonic() - t, 1)

    # ---- 4. SuperLink with TLS + SuperNode authentication; register the sites --------------
    t = time.monotonic()
    link = d.start("superlink", "./start-superlink.sh", coord, env=OWN_HOME)
    wait_for(lambda: port_open(port), 60, "the SuperLink")
    assert "127.0.0.1" in tls_probe("127.0.0.1", port, coord / "ca.pem")
    assert env_of(link.pid)["FEDMETA_TRANSPORT"] == "tls+supernode-auth"
    wait_for(lambda: children(link.pid), 30, "the SuperLink's SuperExec")
    for child in children(link.pid):  # the ServerApp's ancestors carry it too
        assert env_of(child)["FEDMETA_TRANSPORT"] == "tls+supernode-auth"
    d.run('mkdir -p "${FLWR_HOME:-$HOME/.flwr}"', coord)
    d.run('cat flwr-connection.toml >> "${FLWR_HOME:-$HOME/.flwr}/config.toml"', coord)
    d.run("./register-sites.sh <federation>", coord, federation=FED)
    node_ids = dict(line.split() for line in (coord / "state" / "node-ids.txt")
                    .read_text().splitlines())
    assert sorted(node_ids) == sorted(s for s, _ in SITES)
    res = d.run("fedmeta node check <site-dir>", tmp, **{"site-dir": first})
    assert "all checks passed" in res.stdout and "TLSv1" in res.stdout

    # refused: a key nobody registered, and a node that does not trust the federation CA
    rogue = pki.new_node_key()
    pki.write_private(tmp / "rogue.key", pki.node_private_openssh(rogue))
    site0_key = first / "keys" / "supernode-auth.key"
    unregistered = d.start(
        "node-unregistered", "flower-supernode --superlink 127.0.0.1:<port> --root-certificates "
        "<ca> --auth-supernode-private-key <key> --port <rport>", tmp, record=False,
        env={"FLWR_HOME": str(tmp / "rogue-home")}, port=port, ca=coord / "ca.pem",
        key=tmp / "rogue.key", rport=runtime[-1])
    no_ca = d.start(
        "node-no-ca", "flower-supernode --superlink 127.0.0.1:<port> "
        "--auth-supernode-private-key <key> --port <rport>", tmp, record=False,
        env={"FLWR_HOME": str(tmp / "no-ca-home")}, port=port, key=site0_key,
        rport=runtime[-2])

    # ---- 5. the three sites start their nodes ----------------------------------------------
    for site, _ in SITES:
        d.start(f"node-{site}", "<site-dir>/start-node.sh", tmp, env=OWN_HOME,
                **{"site-dir": site_dirs[site]})

    for site, _ in SITES:  # logged once the SuperLink accepted the node
        wait_for(lambda s=site: f"SuperNode ID: {node_ids[s]}" in d.log(f"node-{s}"), 90,
                 f"{site} online")
    d.run("flwr supernode ls <federation>", coord, federation=FED)
    wait_for(lambda: unregistered.poll() is not None, 60, "the unregistered node")
    assert unregistered.returncode != 0
    assert "2004" in d.log("node-unregistered"), d.log("node-unregistered")[-2000:]
    wait_for(lambda: no_ca.poll() is not None, 60, "the node without the CA")
    assert no_ca.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in d.log("node-no-ca"), d.log("node-no-ca")[-2000:]
    for site, _ in SITES:  # inherited by the node's SuperExec, hence by every ClientApp
        node_pid = d.procs[f"node-{site}"].pid
        assert env_of(node_pid)["FEDMETA_TRANSPORT"] == "tls+supernode-auth"
        assert all(env_of(c)["FEDMETA_TRANSPORT"] == "tls+supernode-auth"
                   for c in children(node_pid))
    addresses = d.listening()
    assert addresses and all(a.startswith(("127.0.0.1:", "::1:")) for a in addresses), addresses
    d.timings["superlink+register+nodes"] = round(time.monotonic() - t, 1)

    # ---- 6. run A: two rounds of Reptile with DP, all three sites --------------------------
    t = time.monotonic()
    run_cfg = tomllib.loads(doc_block(doc, "toml", "run.toml"))
    app = copy_project(tmp / "app", {**run_cfg, **RUN_OVERRIDES})
    d.timings["copy project"] = round(time.monotonic() - t, 1)
    out_a = tmp / "server-a"
    write_toml(app / "run.toml", {**run_cfg, **RUN_OVERRIDES, "out-dir": str(out_a)})
    t = time.monotonic()
    res = d.run("flwr run . <federation> --stream --run-config run.toml", app, timeout=400,
                federation=FED)
    wait_for(lambda: (out_a / "summary.json").exists(), 60, "run A's summary")
    d.timings["two-round deployed run (flwr run wall)"] = round(time.monotonic() - t, 1)
    summary = json.loads((out_a / "summary.json").read_text())
    d.timings["two-round deployed run (server wall_s)"] = summary["wall_s"]
    assert summary["sites"] == sorted(s for s, _ in SITES), summary
    assert summary["dp"] is True and not summary["stopped"] and summary["eval"]
    rounds_a = [m for m in metrics(out_a) if m["round"] > 0]
    assert [m["round"] for m in rounds_a] == [1, 2]
    for m in rounds_a:
        assert m["used"] == sorted(s for s, _ in SITES) and not m["lost"], m
    receipts = {site: [Receipt.parse(m["receipts"][site]) for m in rounds_a]
                for site, _ in SITES}

    # ---- 7. run B: a site is lost after round 1; the run finishes with the other two -------
    out_b = tmp / "server-b"
    write_toml(app / "run.toml", {**run_cfg, **RUN_OVERRIDES, "out-dir": str(out_b)})
    t = time.monotonic()
    run_b = d.start("flwr-run-b", "flwr run . <federation> --stream --run-config run.toml",
                    app, record=False, federation=FED)
    wait_for(lambda: any(m["round"] == 1 for m in metrics(out_b)), 300, "run B's round 1",
             every=0.2)
    # the ServerApp's process shows how it reaches the SuperLink: TLS, never --insecure
    serverapp = [cmdline(p) for p in d.tagged_pids() if "flwr-serverapp" in cmdline(p)]
    assert serverapp and all("--root-certificates" in c and "--insecure" not in c
                             for c in serverapp), serverapp
    d.procs[f"node-{LOST}"].send_signal(signal.SIGKILL)  # a crash, not a goodbye
    t_add = time.monotonic()  # meanwhile (the SuperLink notices the loss after ~40 s):
    add_and_remove_site(d, prov, port, runtime)
    d.timings["add+remove site (during run B)"] = round(time.monotonic() - t_add, 1)
    wait_for(lambda: run_b.poll() is not None, 400, "run B to finish", every=1)
    assert run_b.returncode == 0, d.log("flwr-run-b")[-3000:]
    wait_for(lambda: (out_b / "summary.json").exists(), 60, "run B's summary")
    d.timings["run with a lost site"] = round(time.monotonic() - t, 1)
    rounds_b = {m["round"]: m for m in metrics(out_b) if m["round"] > 0}
    assert rounds_b[1]["used"] == sorted(s for s, _ in SITES)
    assert LOST in rounds_b[2]["lost"], rounds_b[2]
    assert rounds_b[2]["used"] == sorted(s for s, _ in SITES if s != LOST), rounds_b[2]
    assert not json.loads((out_b / "summary.json").read_text())["stopped"]

    # ---- 8. the evidence: server and site logs, ledgers --------------------------------------
    for out in (out_a, out_b):
        d.run("fedmeta audit verify <out-dir>/audit/server-audit-log.jsonl", tmp,
              **{"out-dir": out})
    # the transport the start scripts declared is on record at both ends
    start = next(json.loads(x) for x in (out_a / "audit" / "server-audit-log.jsonl")
                 .read_text().splitlines() if json.loads(x)["action"] == "run.start")
    assert start["details"]["transport"] == "tls+supernode-auth", start["details"]
    assert start["details"]["serverapp_tls"] is True
    for site, _ in SITES:
        trains = [json.loads(x) for x in (site_dirs[site] / "audit" / "audit-log.jsonl")
                  .read_text().splitlines() if '"round.train"' in x]
        assert trains and all(e["details"]["transport"] == "tls+supernode-auth"
                              for e in trains), site
    for site, _ in SITES:
        ledger = PrivacyLedger.read(site_dirs[site] / "privacy-ledger.jsonl")
        # the lost site trained in run B's round 1, maybe started round 2 before the crash
        assert len(ledger.charges) in ((3, 4) if site == LOST else (4,)), site
        assert 0 < ledger.epsilon() <= ledger.epsilon_max
        result = verify_log(site_dirs[site] / "audit" / "audit-log.jsonl",
                            public_key=coord / "site-audit-keys" / f"{site}.pub.pem",
                            receipts=receipts[site])
        assert result.ok and all(good for _, good in result.receipts_checked), result.summary()
    d.run("fedmeta ledger show <site-dir>", tmp, **{"site-dir": first})
    d.run("fedmeta audit verify <site-dir>/audit/audit-log.jsonl --public-key "
          "<site-dir>/keys/audit-signing.pub.pem", tmp, **{"site-dir": first})
    res = d.run("fedmeta node check <site-dir>", tmp, **{"site-dir": first})
    assert "charge(s)" in res.stdout

    # ---- 9. rotate site-de-01's SuperNode key ----------------------------------------------
    t = time.monotonic()
    rot = site_dirs[ROTATED]
    old_pub = (rot / "keys" / "supernode-auth.pub").read_bytes()
    d.run("fedmeta node init <site-dir> --new-auth-key", tmp, **{"site-dir": rot})
    assert (rot / "keys" / "supernode-auth.pub").read_bytes() != old_pub
    res = d.run("flwr supernode register <new-key> <federation> --name <site-id>", coord,
                **{"new-key": rot / "keys" / "supernode-auth.pub", "federation": FED,
                   "site-id": ROTATED})
    new_id = re.search(r"SuperNode (\d+) registered", res.stdout).group(1)
    stop(d, f"node-{ROTATED}")
    d.start(f"node-{ROTATED}-rotated", "<site-dir>/start-node.sh", tmp, env=OWN_HOME,
            **{"site-dir": rot})
    wait_for(lambda: f"SuperNode ID: {new_id}" in d.log(f"node-{ROTATED}-rotated"), 90,
             "the rotated node online")
    assert any(n["node-id"] == new_id and n["status"] == "online" for n in d.flwr_nodes(FED))
    d.run("flwr supernode unregister <old-node-id> <federation>", coord,
          **{"old-node-id": node_ids[ROTATED], "federation": FED})
    retired = next((rot / "keys" / "retired").glob("*.key"))
    old = d.start("node-retired-key", "flower-supernode --superlink 127.0.0.1:<port> "
                  "--root-certificates <ca> --auth-supernode-private-key <key> --port <rport>",
                  tmp, record=False, env={"FLWR_HOME": str(tmp / "retired-home")}, port=port,
                  ca=coord / "ca.pem", key=retired, rport=runtime[-3])
    wait_for(lambda: old.poll() is not None, 60, "the retired key's node")
    assert old.returncode != 0 and "2004" in d.log("node-retired-key")
    d.timings["rotate"] = round(time.monotonic() - t, 1)


def add_and_remove_site(d: Deployment, prov: Path, port: int, runtime: list[int]) -> None:
    """Coordinator: add a site to the federation (keys of the others kept), register it,
    then remove it again (unregister its node)."""
    kits = prov / "kits"
    coord = kits / "coordinator"
    before = {p: p.read_bytes() for p in kits.rglob("*")
              if p.is_file() and (p.suffix == ".key" or p.name == "audit-signing.pem")}
    (prov / "federation.toml").write_text(federation_toml(port, runtime, [*SITES, NEW_SITE]))
    d.run("fedmeta provision federation.toml --out kits", prov)
    assert all(p.read_bytes() == data for p, data in before.items()), "a key was replaced"
    assert (coord / "site-keys" / f"{NEW_SITE[0]}.pub").exists()
    d.run("./register-sites.sh <federation> <site-id>", coord, federation=FED,
          **{"site-id": NEW_SITE[0]})
    ids = dict(line.split() for line in (coord / "state" / "node-ids.txt").read_text()
               .splitlines())
    d.run("flwr supernode unregister <node-id> <federation>", coord,
          **{"node-id": ids[NEW_SITE[0]], "federation": FED})
