"""Evidence of a deployed run and the federation's pinned server key, in-process.

Real kits (``fedmeta provision``, keys born at the sites, requests accepted), real
site directories, the real ServerApp and ClientApp, with Flower messages delivered
in-process (``fedmeta.inline_grid``) to nodes configured as deployed sites
(``site-dir`` in their node config), bound to their sites by the coordinator's
registry and signed with the federation's server key, as ``start-superlink.sh``
sets it up. What the real deployment (test_deployment.py) adds is the transport.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from typer.testing import CliRunner

from clients.app import make_client_app
from fedmeta.audit import AuditLog, verify_log
from fedmeta.cli import app as cli
from fedmeta.config import RunConfig
from fedmeta.deploy.evidence import EvidenceError, export_evidence, import_evidence, site_report
from fedmeta.deploy.kits import provision
from fedmeta.deploy.node import init_site
from fedmeta.deploy.registry import Entry, write_registry
from fedmeta.inline_grid import InlineGrid
from fedmeta.paths import NODE_REGISTRY_ENV as REGISTRY_ENV
from fedmeta.paths import PINNED_SERVER_KEY as SITE_PINNED_KEY
from fedmeta.paths import SERVER_AUDIT_KEY_ENV as SERVER_KEY_ENV
from fedmeta.paths import SERVER_AUDIT_PUBKEY, RunPaths, SitePaths
from fedmeta.report import generate
from policies.defaults import EXAMPLE_RUN
from server.app import make_server_app

pytestmark = pytest.mark.slow  # three federated runs (about 15 s each on a quiet machine)

SITES = [("site-de-01", "DE"), ("site-fr-01", "FR")]
FED = """name = "evfed"
[superlink]
host = "127.0.0.1"
port = 9093
bind = "127.0.0.1"
sans = ["127.0.0.1"]
""" + "".join(
    f'\n[[sites]]\nid = "{s}"\ncountry = "{c}"\nindex = {i}\n' for i, (s, c) in enumerate(SITES)
)
RUN = {
    "sites": 2,
    "rounds": 2,
    "min-sites": 2,
    "fraction-train": 1.0,
    "dp": True,
    "node-wait-s": 5.0,
    "round-timeout-s": 60.0,
    "eval-episodes": 2,
}


def fill_manifest(site_dir: Path, site: str) -> None:
    path = SitePaths(site_dir).manifest
    text = re.sub(
        r'institution = "TODO[^"]*"', f'institution = "Hospital {site}"', path.read_text()
    )
    text = re.sub(r'dpo_contact = "TODO[^"]*"', f'dpo_contact = "dpo@{site}.example.org"', text)
    text = re.sub(r'"([A-Z]{2}): TODO[^"]*"', r'"\1: research provision (test)"', text)
    path.write_text(
        text.replace("collection_dates_recorded = true", "collection_dates_recorded = false")
    )


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Provisioned kits and two initialised, approved site directories."""
    from fedmeta.approvals import approve_file

    tmp = tmp_path_factory.mktemp("evfed")
    (tmp / "federation.toml").write_text(FED)
    kits = tmp / "kits"
    provision(tmp / "federation.toml", kits)
    dirs = {s: tmp / "sites" / s for s, _ in SITES}
    requests = [init_site(dirs[s], kits / "sites" / s).request for s, _ in SITES]
    provision(tmp / "federation.toml", kits, requests=requests)
    for s, _ in SITES:
        init_site(dirs[s], kits / "sites" / s)
        fill_manifest(dirs[s], s)
        approve_file(dirs[s], EXAMPLE_RUN)
    return tmp, kits, dirs


def deployed_run(
    tmp: Path,
    kits: Path,
    dirs: dict[str, Path],
    monkeypatch,
    server_key: Path | None = None,
    **overrides,
) -> Path:
    """One run of the real ServerApp against the sites' real ClientApp; returns its out-dir."""
    client_app = make_client_app()
    grid = InlineGrid(client_app, len(SITES))
    for i, (_, ctx) in enumerate(sorted(grid.contexts.items())):
        site = SITES[i][0]
        ctx.node_config = {"site-dir": str(dirs[site]), "site-id": site, "site-index": i}
    registry = tmp / "node-ids.txt"
    write_registry(
        registry,
        {
            SITES[i][0]: Entry(SITES[i][0], node, "SHA256:x")
            for i, node in enumerate(sorted(grid.contexts))
        },
    )
    monkeypatch.setenv(REGISTRY_ENV, str(registry))
    monkeypatch.setenv(
        SERVER_KEY_ENV,
        str(server_key or kits / "coordinator" / "keys" / "server-audit-signing.pem"),
    )
    runs = tmp / "runs"
    cfg = RunConfig.from_flat({**RUN, **overrides, "out-dir": str(runs / "{run}")})
    before = set(runs.iterdir()) if runs.is_dir() else set()
    TaskIdentity.task_id, TaskIdentity.run_id = 1, grid.run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    make_server_app(cfg)(
        grid,
        Context(
            run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}
        ),
    )
    (out,) = set(runs.iterdir()) - before  # the run's own directory, runs/<run id>
    assert RunPaths(out).summary.exists() and "{run}" not in str(out)
    return out


@pytest.fixture(scope="module")
def two_runs(federation, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        tmp, kits, dirs = federation
        out_a = deployed_run(tmp, kits, dirs, mp)
        out_b = deployed_run(tmp, kits, dirs, mp, rounds=1)
    finally:
        mp.undo()
    return out_a, out_b


def trust(kits: Path) -> list[str]:
    coord = kits / "coordinator"
    return [str(coord / "site-audit-keys"), str(coord / SERVER_AUDIT_PUBKEY)]


def run_id(out: Path) -> str:
    return json.loads(RunPaths(out).summary.read_text())["run"]


def test_each_run_gets_its_own_directory_signed_with_the_federation_key(federation, two_runs):
    tmp, kits, dirs = federation
    out_a, out_b = two_runs
    assert out_a != out_b and out_a.parent == out_b.parent
    pub = kits / "coordinator" / "keys" / "server-audit-signing.pub.pem"
    for out in two_runs:
        assert verify_log(RunPaths(out).server_log, public_key=pub).ok
        assert not RunPaths(out).server_key.exists()  # no per-run key
        assert {json.loads(x)["run"] for x in RunPaths(out).metrics.read_text().splitlines()} == {
            run_id(out)
        }
    for site, _ in SITES:  # the kit pinned the federation's key at the site
        assert (dirs[site] / SITE_PINNED_KEY).read_bytes() == pub.read_bytes()


def test_sites_keep_the_run_record_and_log_the_declaration(federation, two_runs):
    tmp, kits, dirs = federation
    for site, _ in SITES:
        log = [json.loads(x) for x in (SitePaths(dirs[site]).audit_log).read_text().splitlines()]
        for out in two_runs:
            rid = run_id(out)
            record = [e for e in log if e["action"] == "run.record" and e["run_id"] == rid]
            assert [e["decision"] for e in record] == ["allow"], record
            assert record[0]["details"]["server_key"] == "pinned"
            kept = dirs[site] / "runs" / rid / "audit" / "server-audit-log.jsonl"
            assert kept.read_bytes() == RunPaths(out).server_log.read_bytes()
            trains = [e for e in log if e["action"] == "round.train" and e["run_id"] == rid]
            assert trains and all(e["details"]["declaration_sha256"] for e in trains)
            # which code and which declaration, once per run, as the server's run.start says
            start = json.loads(RunPaths(out).server_log.read_text().splitlines()[1])
            assert start["action"] == "run.start"
            (app,) = [e for e in log if e["action"] == "run.app" and e["run_id"] == rid]
            assert app["details"]["app_sha256"] == start["details"]["app_sha256"]
            assert app["details"]["declaration_sha256"] == start["details"]["declaration_sha256"]


def test_coordinator_report_from_exported_evidence(federation, two_runs, tmp_path):
    """Sites export run A's evidence after run B happened; the coordinator imports it into
    run A's out-dir: the report verifies against the registered keys (no false alarm from
    run B's entries, which the sites' logs hold too)."""
    tmp, kits, dirs = federation
    out_a, out_b = two_runs
    rid = run_id(out_a)
    runner = CliRunner()
    before = generate(
        out_a, "json", out=tmp_path / "r0.json", trust=trust(kits), allow_unverified=True
    )[1]
    assert not before.checks_passed  # the sites' evidence is not there yet
    bundles = []
    for site, _ in SITES:
        res = runner.invoke(cli, ["node", "export-evidence", str(dirs[site]), "--run", rid])
        assert res.exit_code == 0, res.output
        bundle = dirs[site] / "exports" / f"evidence-{site}-{rid}.json"
        assert "sha256" in res.output and bundle.exists()
        data = json.loads(bundle.read_text())
        assert all(json.loads(x)["run_id"] != run_id(out_b) for x in data["log"])
        bundles.append(bundle)
    res = runner.invoke(
        cli,
        [
            "evidence",
            "import",
            str(out_a),
            *map(str, bundles),
            "--keys",
            str(kits / "coordinator" / "site-audit-keys"),
        ],
    )
    assert res.exit_code == 0, res.output
    path, report = generate(out_a, "json", out=tmp_path / "r.json", trust=trust(kits))
    assert report.checks_passed and report.keys_trusted, [
        (c.check, c.detail) for c in report.audit.cross_checks if not c.ok
    ]
    assert {lg.party: lg.status for lg in report.audit.logs} == {
        "server": "verified",
        **{s: "verified" for s, _ in SITES},
    }
    # importing the same file again is a no-op; the whole site log (with run B) also verifies
    assert import_evidence(out_a, bundles[0]).site == SITES[0][0]
    whole = tmp_path / "whole"
    import shutil

    shutil.copytree(out_a, whole)
    for rel in ("audit/audit-log.jsonl", "privacy-ledger.jsonl"):  # as the site holds them
        shutil.copyfile(dirs[SITES[0][0]] / rel, whole / "sites" / SITES[0][0] / rel)
    assert generate(whole, "json", out=tmp_path / "w.json", trust=trust(kits))[1].checks_passed


def test_import_refuses_another_run_a_foreign_key_and_an_edited_log(federation, two_runs, tmp_path):
    tmp, kits, dirs = federation
    out_a, out_b = two_runs
    site = SITES[0][0]
    bundle, _ = export_evidence(dirs[site], run_id(out_a), tmp_path / "e.json")
    import shutil

    b_copy = tmp_path / "b"
    shutil.copytree(out_b, b_copy)
    with pytest.raises(EvidenceError, match="holds run"):
        import_evidence(b_copy, bundle)
    a_copy = tmp_path / "a"
    shutil.copytree(out_a, a_copy, ignore=shutil.ignore_patterns("sites"))  # none imported
    other = kits / "coordinator" / "site-audit-keys" / f"{SITES[1][0]}.pub.pem"
    with pytest.raises(EvidenceError, match="not the audit key"):
        import_evidence(a_copy, bundle, other)
    data = json.loads(bundle.read_text())
    data["log"][3] = (
        data["log"][3].replace('"allow"', '"deny"', 1)
        if '"allow"' in data["log"][3]
        else data["log"][3].replace("round", "rounD", 1)
    )
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))
    with pytest.raises(EvidenceError, match="does not verify"):
        import_evidence(a_copy, edited, kits / "coordinator" / "site-audit-keys")
    assert not RunPaths(a_copy).site(site).root.exists()
    with pytest.raises(EvidenceError, match="no entry of run"):
        export_evidence(dirs[site], "20000101T000000Z-000000", tmp_path / "x.json")


def test_a_site_reports_on_a_run_from_its_own_directory(federation, two_runs, tmp_path):
    tmp, kits, dirs = federation
    out_a, _ = two_runs
    rid = run_id(out_a)
    site = SITES[1][0]
    res = CliRunner().invoke(
        cli, ["report", "--site-dir", str(dirs[site]), "--run", rid, "--format", "json"]
    )
    assert res.exit_code == 0, res.output
    path = dirs[site] / "runs" / rid / f"report-{site}.json"
    doc = json.loads(path.read_text())
    assert doc["verified"] is True, doc["audit"]
    assert [s["site_id"] for s in doc["privacy"]] == [site]
    _, report = site_report(dirs[site], rid, "json", tmp_path / "s.json")
    assert report.checks_passed and report.keys_trusted
    with pytest.raises(EvidenceError, match="no run record"):
        site_report(dirs[site], "20000101T000000Z-000000", "json")
    res = CliRunner().invoke(cli, ["report", "--site-dir", str(dirs[site])])
    assert res.exit_code == 2 and "--run" in res.output


def test_a_round_signed_by_another_server_key_is_refused_and_audited(
    federation, two_runs, tmp_path, monkeypatch
):
    """A coordinator (or anyone who can start a run) signing with a key of its own: every
    site declines before anything is charged, on record."""
    tmp, kits, dirs = federation
    rogue = tmp_path / "rogue" / "server-audit-signing.pem"
    AuditLog.open(tmp_path / "rogue" / "x.jsonl", rogue, actor="server").close()
    charges = {s: SitePaths(dirs[s]).ledger.read_text().count('"charge"') for s, _ in SITES}
    out = deployed_run(tmp, kits, dirs, monkeypatch, server_key=rogue, rounds=1)
    (line,) = [
        json.loads(x)
        for x in RunPaths(out).metrics.read_text().splitlines()
        if json.loads(x)["round"] == 1
    ]
    assert not line["used"] and sorted(line["declined"]) == [s for s, _ in SITES], line
    for site, _ in SITES:
        log = [json.loads(x) for x in (SitePaths(dirs[site]).audit_log).read_text().splitlines()]
        mine = [e for e in log if e["run_id"] == run_id(out)]
        assert [e["rule_ids"] for e in mine if e["decision"] == "deny"][0] == ["SITE-SERVER-KEY"], (
            mine
        )
        assert not [e for e in mine if e["action"] == "round.train"]
        assert SitePaths(dirs[site]).ledger.read_text().count('"charge"') == charges[site]
        # its run record is refused too: the server log is not the pinned key's
        assert [e["decision"] for e in mine if e["action"] == "run.record"] == ["deny"]
        assert not (dirs[site] / "runs" / run_id(out)).exists()
