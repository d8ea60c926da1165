"""Incidents with legal clocks: a tampered log opens an incident with the right deadlines,
the decision is recorded with its reasons and audited, and the report lists it."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedmeta.audit import verify_log
from fedmeta.cli import app
from fedmeta.incidents import Incident, IncidentStore, clocks
from fedmeta.incidents.detect import signals
from fedmeta.paths import RunPaths
from fedmeta.report import build_report

pytestmark = pytest.mark.slow


def tampered(run_dir: Path, tmp_path: Path, site: str) -> Path:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("report*", "incidents"))
    log = RunPaths(run).site(site).audit_log
    data = bytearray(log.read_bytes())
    at = data.index(b'"examples":') + len(b'"examples":')
    data[at] = ord("3") if data[at] != ord("3") else ord("4")
    log.write_bytes(bytes(data))
    return run


def cli(*args: str):
    return CliRunner().invoke(app, ["incident", *args])


def test_an_intact_run_opens_no_incident(run_dir):
    assert signals(run_dir, datetime.now(UTC)) == []


def test_a_tampered_log_opens_one_incident_with_the_legal_clocks(run_dir, tmp_path):
    run = tampered(run_dir, tmp_path, "site-1")
    before = datetime.now(UTC)
    res = cli("scan", str(run))
    assert res.exit_code == 0, res.output
    (incident,) = IncidentStore(run).load()
    assert incident.kind == "log-verification-failed" and incident.site_id == "site-1"
    assert "sites/site-1/audit/audit-log.jsonl" in incident.summary
    assert before <= incident.aware_at <= datetime.now(UTC)
    gdpr33, gdpr34 = clocks(incident, incident.aware_at)
    assert gdpr33.reference == "GDPR Art. 33(1)" and gdpr34.reference == "GDPR Art. 34(1)"
    assert gdpr33.deadline == incident.aware_at + timedelta(hours=72)
    assert gdpr34.deadline is None and gdpr33.in_force == "binding"
    assert not incident.dpdp  # site-1 is a GDPR-only site: no DPDP clock
    # a second scan opens nothing new; the opening is in the incident audit log
    assert "0 new incident(s)" in cli("scan", str(run)).output
    log = run / "incidents" / "audit-log.jsonl"
    entries = [json.loads(x) for x in log.read_text().splitlines()]
    assert [e["action"] for e in entries if not e["action"].startswith("log.")] == ["incident.open"]
    assert verify_log(log).ok


def test_a_dpdp_site_runs_the_r7_clock_beside_gdpr(run_dir, tmp_path):
    run = tampered(run_dir, tmp_path, "site-2")  # IN: GDPR + DPDP
    (incident,) = signals(run, datetime(2026, 11, 30, 9, 0, tzinfo=UTC))
    assert incident.site_id == "site-2" and incident.dpdp
    on = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
    by_ref = {c.reference: c for c in clocks(incident, on)}
    r7 = by_ref["DPDP Rules 2025 r.7(2)(b)"]
    assert r7.deadline == datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
    assert r7.in_force == "readiness (applies from 2027-05-13)"
    assert by_ref["DPDP Rules 2025 r.7(1)"].deadline is None
    assert r7.state(on, False) == "24 h left"
    assert by_ref["GDPR Art. 33(1)"].state(on + timedelta(hours=30), False) == "OVERDUE by 6 h"
    assert clocks(incident, datetime(2027, 5, 13, tzinfo=UTC))[3].in_force == "binding"


def test_the_decision_is_recorded_with_reasons_audited_and_final(run_dir, tmp_path):
    run = tampered(run_dir, tmp_path, "site-1")
    cli("scan", str(run))
    (incident,) = IncidentStore(run).load()
    short = cli("decide", str(run), incident.id, "--no-notify", "--reasons", "no", "--by", "x")
    assert short.exit_code == 2 and "--reasons" in short.output
    res = cli(
        "decide",
        str(run),
        incident.id,
        "--no-notify",
        "--reasons",
        "an edited count in a site's own log: no personal data disclosed or lost; "
        "integrity restored from the server's receipts",
        "--by",
        "DPO of site-1",
    )
    assert res.exit_code == 0 and "not notified (reasons recorded, Art. 33(5))" in res.output
    again = cli(
        "decide",
        str(run),
        incident.id,
        "--notify",
        "--reasons",
        "changed my mind",
        "--by",
        "someone",
    )
    assert again.exit_code == 2 and "not overwritten" in again.output
    decided = IncidentStore(run).get(incident.id)
    assert decided.decision is not None and not decided.decision.notify_authority
    log = run / "incidents" / "audit-log.jsonl"
    actions = [json.loads(x)["action"] for x in log.read_text().splitlines()]
    assert actions.count("incident.decide") == 1 and verify_log(log).ok
    shown = cli("show", str(run), incident.id)
    assert shown.exit_code == 0 and "GDPR Art. 33(1)" in shown.output
    assert "no personal data disclosed" in shown.output
    assert cli("show", str(run), "INC-nope").exit_code == 2
    # the report lists it, with its clocks and reasons
    report = build_report(run, allow_unverified=True)
    (row,) = report.incidents
    assert row.id == incident.id and row.reasons and "UTC" in row.art33_deadline
    assert row.dpdp_deadline is None


def test_an_undecided_incident_is_a_finding_and_overdue_is_an_error(run_dir, tmp_path):
    run = tampered(run_dir, tmp_path, "site-1")
    store = IncidentStore(run)
    (found,) = signals(run, datetime.now(UTC) - timedelta(hours=80))
    store.open_new([found])
    report = build_report(run, allow_unverified=True)
    (f,) = [f for f in report.findings if f.section == "incidents"]
    assert f.severity == "error" and "OVERDUE" in f.message
    site0 = build_report(run, site="site-0", allow_unverified=True)
    assert site0.incidents == []  # another site's incident stays out of a site report


def test_a_corrupt_incident_file_is_one_line(run_dir, tmp_path):
    run = tampered(run_dir, tmp_path, "site-1")
    (run / "incidents").mkdir()
    (run / "incidents" / "incidents.json").write_text('[{"id": 1}]')
    res = cli("list", str(run))
    assert res.exit_code == 2 and "incidents.json: not a valid incident file" in res.output
    assert Incident.make_id("a", "r", None, "s") == Incident.make_id("a", "r", None, "s")


def test_a_sites_refusal_of_code_or_of_a_foreign_server_key_opens_an_incident(run_dir, tmp_path):
    from fedmeta.audit import AuditLog
    from fedmeta.paths import SITE_AUDIT_KEY as AUDIT_KEY
    from fedmeta.paths import SITE_AUDIT_LOG as AUDIT_LOG

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("report*", "incidents"))
    run_id = json.loads(RunPaths(run).summary.read_text())["run"]
    site = RunPaths(run).site("site-2").root
    with AuditLog.open(site / AUDIT_LOG, site / AUDIT_KEY, actor="site-2") as log:
        log.append(
            "round.decline",
            run_id=run_id,
            round=3,
            decision="deny",
            rule_ids=["SITE-SERVER-KEY"],
            details={"reason": "round.start is not signed by the pinned server key"},
        )
        log.append(
            "round.decline",
            run_id=run_id,
            round=4,
            decision="deny",
            rule_ids=["SITE-CONFIG"],
            details={"reason": "task os:getcwd not installed"},
        )
        # an app refused after this run ended belongs to another run: no incident here
        log.append(
            "app.refuse",
            run_id="flwr-99",
            decision="deny",
            rule_ids=["SITE-APP"],
            details={"reason": "app sha256 00ab is not approved"},
        )
    found = {(i.kind, i.site_id) for i in signals(run, datetime.now(UTC))}
    assert found == {("server-key-mismatch", "site-2"), ("unapproved-code", "site-2")}
