"""Policies and audit log wired into real simulated rounds (in-process grid, real
ServerApp and ClientApp)."""

from __future__ import annotations

import json

from helpers import consent_declaration, fedmeta, manifest, run_inline, write_site

from fedmeta.audit import Receipt, verify_log
from fedmeta.data.tasks import get_task
from fedmeta.paths import RunPaths

CONSTRUCTED = {"GDPR-17": 5, "GDPR-7-3": 7, "GDPR-MINORS": 4, "GDPR-5-1-e": 6}
# what leaves the site: counts below its minimum cohort size (5) are suppressed
RELEASED = {"GDPR-17": 5, "GDPR-7-3": 7, "GDPR-MINORS": "<5", "GDPR-5-1-e": 6}


def metrics(run_dir):
    return [json.loads(x) for x in RunPaths(run_dir).metrics.read_text().splitlines()]


def test_exclusions_denials_and_receipts_in_a_real_run(tmp_path):
    out = tmp_path / "run"
    for i in range(3):
        write_site(out, i, manifest(f"site-{i}"), CONSTRUCTED if i == 0 else None, num_sites=4)
    write_site(out, 3, manifest("site-3", "CN"), num_sites=4)  # non-adequate, no SCC
    run_inline(
        out,
        sites=4,
        rounds=2,
        fraction_train=1.0,
        eval_every=0,
        eval_episodes=3,
        declaration=str(consent_declaration(tmp_path / "run.toml")),
    )
    lines = metrics(out)
    assert lines[0]["eligible"] == ["site-0", "site-1", "site-2"]
    assert "GDPR-44" in lines[0]["denied"]["site-3"]
    for line in lines[1:]:
        assert line["sampled"] == ["site-0", "site-1", "site-2"]  # site-3 never sampled
        assert line["exclusions"]["site-0"] == RELEASED
        assert "site-1" not in line["exclusions"]
    summary = json.loads(RunPaths(out).summary.read_text())
    assert summary["exclusions"]["site-0"] == RELEASED

    # the site's own signed log holds the same counts, and the server's copy of its
    # receipts verifies against it
    site_log = RunPaths(out).site("site-0").audit_log
    entries = [json.loads(x) for x in site_log.read_text().splitlines()]
    records = [e for e in entries if e["action"] == "policy.records"]
    assert [e["counts"] for e in records] == [CONSTRUCTED, CONSTRUCTED]
    assert records[0]["decision"] == "allow-with-exclusions"
    assert all(set(e) >= {"seq", "prev", "sig"} for e in entries)
    server_log = RunPaths(out).server_log
    server = [json.loads(x) for x in server_log.read_text().splitlines()]
    receipts = [
        Receipt.parse(e["details"]["receipt"])
        for e in server
        if e["action"] == "round.receipt" and e["details"]["site"] == "site-0"
    ]
    assert len(receipts) == 2
    result = verify_log(site_log, receipts=receipts)
    assert result.ok and all(ok for _, ok in result.receipts_checked)
    assert verify_log(server_log).ok
    denials = {
        e["rule_ids"][0] for e in server if e["action"] == "policy.run" and e["decision"] == "deny"
    }
    assert denials == {"GDPR-44-MODEL"}  # the model may not go to a CN site without SCC
    # the site logged the server's checkpoint head it received in round 2
    trains = [e for e in entries if e["action"] == "round.train"]
    assert trains[0]["details"]["server_head"] is None
    checkpoint = next(e for e in server if e["action"] == "checkpoint" and e["round"] == 1)
    assert trains[1]["details"]["server_head"].startswith(f"{checkpoint['seq']}:")
    # nothing but counts and pseudonymous ids left the site: no record id in the server's log
    site_ids = set(get_task("digits-fewshot", num_sites=4).site_records(0).record_ids)
    assert not any(rid in server_log.read_text() for rid in list(site_ids)[:50])
    # CLI verification of the site log with a receipt
    cli = fedmeta("audit", "verify", str(site_log), "--receipt", str(receipts[-1]), isolate=False)
    assert cli.returncode == 0, cli.stdout + cli.stderr


def test_run_with_too_few_eligible_sites_is_not_started(tmp_path):
    out = tmp_path / "run"
    write_site(out, 0, manifest("site-0"), num_sites=2)
    write_site(out, 1, manifest("site-1", "CN"), num_sites=2)
    res = fedmeta(
        "simulate",
        "--backend",
        "inline",
        "--sites",
        "2",
        "--rounds",
        "2",
        "--out",
        str(out),
        "--set",
        "eval-episodes=3",
        "--set",
        f"declaration={consent_declaration(tmp_path / 'run.toml')}",
        isolate=False,
    )
    assert res.returncode == 1, res.stderr[-3000:]  # a run that cannot start fails loudly
    summary = json.loads(RunPaths(out).summary.read_text())
    assert "fewer than the declared minimum" in summary["stopped"]
    assert "FAILED: 1 eligible site(s), fewer than the declared minimum" in res.stderr
    assert "stopped" in res.stdout
    server = [json.loads(x) for x in RunPaths(out).server_log.read_text().splitlines()]
    assert any(e["action"] == "run.stop" for e in server)
    assert not RunPaths(out).site("site-0").ledger.exists()  # nobody trained
