"""A real deployment where the coordinator turns DP off: the sites decline.

Two sites whose manifests require DP (the kit's default ``[privacy]`` table),
TLS and SuperNode authentication as in docs/deploy.md. The coordinator runs
``flwr run . <federation> --run-config "dp=false"`` from a copy of the project
whose server skips its own run-level rules (a hostile or careless coordinator
controls its server), so the round reaches the sites. Each site declines with
``SITE-POLICY.dp_required`` before anything is charged or trained, the server
counts the declines, and the refusal is in each site's signed audit log.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from deploy_helpers import Deployment, copy_project, free_ports, wait_for
from test_deployment import (
    FED,
    OWN_HOME,
    children,
    federation_toml,
    fill_manifest,
    metrics,
    port_open,
)

from fedmeta.audit import verify_log
from policies.defaults import EXAMPLE_RUN

pytestmark = pytest.mark.slow

SITES = [("site-de-01", "DE"), ("site-fr-01", "FR")]
RUN = {"sites": 2, "rounds": 1, "min-sites": 2, "fraction-train": 1.0, "eval-episodes": 2,
       "node-wait-s": 60.0, "round-timeout-s": 120.0, "dp": True}  # flipped on the command line
ELIGIBLE = "    eligible = {m.site_id for m in eligible_sites(decisions, list(manifests.values()))}"


def test_a_run_with_dp_off_is_declined_by_every_site(tmp_path: Path) -> None:
    d = Deployment(tmp_path)
    try:
        _scenario(d, tmp_path)
    finally:
        d.stop_all()
    assert not d.tagged_pids()


def _scenario(d: Deployment, tmp: Path) -> None:
    port, *runtime = free_ports(1 + len(SITES))
    prov = tmp / "provisioner"
    prov.mkdir()
    (prov / "federation.toml").write_text(federation_toml(port, runtime, SITES))
    d.run("fedmeta provision federation.toml --out kits", prov)
    kits = prov / "kits"
    coord = kits / "coordinator"
    site_dirs = {site: tmp / site for site, _ in SITES}
    for site, _ in SITES:
        d.run("fedmeta node init <site-dir> --kit <kit>", tmp, **{
            "site-dir": site_dirs[site], "kit": kits / "sites" / site})
        fill_manifest(site_dirs[site], site)
        d.run("fedmeta node approve <site-dir> <declaration>", tmp, **{
            "site-dir": site_dirs[site], "declaration": EXAMPLE_RUN})
        assert "dp_required = true" in (site_dirs[site] / "manifest.toml").read_text()

    link = d.start("superlink", "./start-superlink.sh", coord, env=OWN_HOME)
    wait_for(lambda: port_open(port), 60, "the SuperLink")
    wait_for(lambda: children(link.pid), 30, "the SuperLink's SuperExec")
    d.run('mkdir -p "${FLWR_HOME:-$HOME/.flwr}"', coord)
    d.run('cat flwr-connection.toml >> "${FLWR_HOME:-$HOME/.flwr}/config.toml"', coord)
    d.run("./register-sites.sh <federation>", coord, federation=FED)
    node_ids = dict(line.split() for line in (coord / "state" / "node-ids.txt")
                    .read_text().splitlines())
    for site, _ in SITES:
        d.start(f"node-{site}", "<site-dir>/start-node.sh", tmp, env=OWN_HOME,
                **{"site-dir": site_dirs[site]})
    for site, _ in SITES:
        wait_for(lambda s=site: f"SuperNode ID: {node_ids[s]}" in d.log(f"node-{s}"), 90,
                 f"{site} online")

    # the coordinator's own server skips its run-level rules (PRIV-DP would stop it there)
    app = copy_project(tmp / "app", RUN)
    run_py = app / "server" / "run.py"
    text = run_py.read_text()
    assert ELIGIBLE in text
    run_py.write_text(text.replace(ELIGIBLE, "    eligible = set(manifests)"))
    out = tmp / "server"
    # flwr takes either TOML files or key=value pairs: the whole run as pairs, dp=false last
    pairs = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower()}"
                     for k, v in {**RUN, "out-dir": str(out)}.items())
    t = time.monotonic()
    d.run('flwr run . <federation> --stream --run-config <pairs> --run-config "dp=false"',
          app, timeout=400, federation=FED, pairs=pairs)
    wait_for(lambda: (out / "summary.json").exists(), 120, "the run's summary")
    print(f"dp=false deployed run: {time.monotonic() - t:.0f} s")

    rounds = [m for m in metrics(out) if m["round"] > 0]
    assert rounds and not rounds[0]["used"], rounds
    assert sorted(rounds[0]["declined"]) == sorted(s for s, _ in SITES), rounds[0]
    assert all("dp_required" in r for r in rounds[0]["declined"].values())
    for site, _ in SITES:
        log = site_dirs[site] / "audit" / "audit-log.jsonl"
        entries = [json.loads(x) for x in log.read_text().splitlines()]
        deny = [e for e in entries if e["decision"] == "deny"]
        assert [e["rule_ids"] for e in deny] == [["SITE-POLICY.dp_required"]], deny
        assert deny[0]["action"] == "privacy.decline"
        assert not any(e["action"] == "round.train" for e in entries)
        assert not (site_dirs[site] / "privacy-ledger.jsonl").exists()
        pub = coord / "site-audit-keys" / f"{site}.pub.pem"
        assert verify_log(log, public_key=pub).ok
