"""`fedmeta report` on a real simulated run: content equals the evidence, formats, refusal."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
from helpers import consent_declaration, fedmeta, manifest, run_inline, write_site
from report_helpers import SITE0, SITE2

from fedmeta.audit import verify_log
from fedmeta.paths import RunPaths
from fedmeta.privacy.ledger import PrivacyLedger
from fedmeta.report import write_report
from fedmeta.report.render import SCHEMA_FILE

pytestmark = pytest.mark.slow

SITES = ("site-0", "site-1", "site-2")
OTHERS = ("site-0", "site-1", "site-3")


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def site_log(run: Path, site: str) -> Path:
    return RunPaths(run).site(site).audit_log


@pytest.fixture(scope="module")
def trust(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The parties' public keys registered out of band: a directory laid out like the
    coordinator kit's site-audit-keys/ (plus the server's key)."""
    keys = tmp_path_factory.mktemp("registered-keys")
    shutil.copyfile(RunPaths(run_dir).server_pubkey, keys / "server-audit-signing.pub.pem")
    for site in SITES:
        shutil.copyfile(RunPaths(run_dir).site(site).audit_pubkey, keys / f"{site}.pub.pem")
    return str(keys)


@pytest.fixture(scope="module")
def report(run_dir: Path, trust: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("json") / "report.json"
    write_report(run_dir, "json", out=out, baseline=run_dir, trust=[trust])
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def html(run_dir: Path, trust: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_report(
        run_dir, "html", out=tmp_path_factory.mktemp("html") / "report.html", trust=[trust]
    )


def test_json_follows_the_schema_kept_in_the_repo(report):
    jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text())).validate(report)
    assert report["verified"] is True and report["unverified_warning"] is None
    assert report["keys_trusted"] and report["evidence_basis"].startswith("EVIDENCE: every log")
    assert "SIMULATION" in report["evidence_basis"]
    assert report["scope"] == {"kind": "federation", "site_id": None}


def test_epsilon_per_site_equals_the_ledgers(run_dir, report):
    privacy = {p["site_id"]: p for p in report["privacy"]}
    assert set(privacy) == set(SITES)
    # what each site enforced, as it signed it: noise source, policy, approved declaration
    start = next(
        json.loads(x)
        for x in (RunPaths(run_dir).server_log).read_text().splitlines()
        if '"run.start"' in x
    )
    for site in SITES:
        p = privacy[site]
        assert p["noise_source"] == "seeded" and len(p["site_policy_sha256"]) == 64
        assert p["declaration_sha256"] == start["details"]["declaration_sha256"]
        assert (
            "The site enforced" in p["statement"] and "seeded from the run seed" in p["statement"]
        )
    for site in SITES:
        ledger = PrivacyLedger.read(RunPaths(run_dir).site(site).ledger)
        summary = ledger.summary()
        p = privacy[site]
        assert p["epsilon_total"] == pytest.approx(summary["epsilon"], rel=1e-12)
        assert p["epsilon_run"] == summary["entries"][-1]["epsilon_after"]
        assert p["epsilon_max"] == summary["epsilon_max"] == 10.0
        assert p["budget_left"] == pytest.approx(10.0 - summary["epsilon"])
        assert p["rounds_joined"] == [e["round"] for e in summary["entries"]] == [1, 2]
        assert p["noise_multipliers"] == sorted({e["noise_multiplier"] for e in summary["entries"]})
        assert p["accountant"] == summary["accountant"] and p["delta"] == summary["delta"]
        assert p["privacy_unit"].startswith("one image")  # digits: an image's 4 rotations
        assert f"({p['epsilon_run']:.3g}, {p['delta']:g})" in p["statement"]


def test_exclusion_counts_equal_the_site_logs_with_small_counts_suppressed(run_dir, report):
    rows = {(r["site_id"], r["rule_id"]): r for r in report["policy"]["exclusions"]}
    for site, plan in (("site-0", SITE0), ("site-2", SITE2)):
        logged = [e for e in lines(site_log(run_dir, site)) if e["action"] == "policy.records"]
        assert [e["counts"] for e in logged] == [plan, plan]
        for rule, n in plan.items():
            row = rows[(site, rule)]
            assert row["count"] == (n if n >= 5 else "<5")
            assert row["first_round"] == 1 and row["rounds"] == [1, 2]
            assert row["references"]
    assert not any(site == "site-1" for site, _ in rows)
    assert rows[("site-0", "GDPR-MINORS")]["count"] == "<5"  # 4 records: below the cohort of 5
    assert rows[("site-2", "GDPR-17")]["count"] == "<5"  # 3 records
    totals = {t["rule_id"]: t["count"] for t in report["policy"]["exclusion_totals"]}
    assert totals["GDPR-7-3"] == 13 and totals["GDPR-5-1-e"] == 6
    assert totals["GDPR-MINORS"] == "withheld"  # 4 + 3: both parts suppressed
    assert totals["GDPR-17"] == "withheld"  # 5 + 3 would give the suppressed 3 away


def _ints(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def test_no_suppressed_count_can_be_recovered_by_arithmetic(report):
    """Every derived sum is shown only when all its parts are: no figure minus shown
    figures gives a suppressed count back (the DPDP children total in particular)."""
    rows = {(r["site_id"], r["rule_id"]): r["count"] for r in report["policy"]["exclusions"]}
    totals = {t["rule_id"]: t["count"] for t in report["policy"]["exclusion_totals"]}
    derived: list[tuple[object, list[object]]] = []
    for rule, total in totals.items():
        derived.append((total, [c for (_, r), c in rows.items() if r == rule]))
    for d in report["dpdp"]["sites"]:
        parts = [rows.get((d["site_id"], r), 0) for r in ("GDPR-MINORS", "DPDP-9-1")]
        derived.append((d["children_excluded"], parts))
    # the suppressed counts of this run (site-2 GDPR-MINORS/GDPR-17, site-0 GDPR-MINORS)
    hidden = {3, 4}
    for figure, parts in derived:
        if _ints(figure):
            assert all(_ints(p) for p in parts), (figure, parts)
            shown = [p for p in parts if _ints(p)]
            for i in range(1 << len(shown)):  # figure minus any subset of the shown parts
                rest = figure - sum(p for b, p in enumerate(shown) if i >> b & 1)
                assert rest not in hidden or not any(isinstance(p, str) for p in parts)
    site2 = next(d for d in report["dpdp"]["sites"] if d["site_id"] == "site-2")
    assert rows[("site-2", "GDPR-MINORS")] == "<5" and rows[("site-2", "DPDP-9-1")] == 5
    assert site2["children_excluded"] == "withheld"  # 8 would give 8 - 5 = 3 away


def test_min_cohort_below_5_is_a_warning(tmp_path):
    """A site that suppresses nothing (min_cohort_size 1) is a warning. The manifest is the
    site's own (it signs its hash), so the run is built with it."""
    run = tmp_path / "run"
    write_site(run, 0, manifest("site-0"), num_sites=2)
    write_site(run, 1, manifest("site-1", extra="min_cohort_size = 1"), num_sites=2)
    run_inline(
        run,
        sites=2,
        rounds=1,
        fraction_train=1.0,
        eval_every=0,
        eval_episodes=2,
        declaration=str(consent_declaration(tmp_path / "run.toml")),
    )
    out = write_report(run, "json", out=tmp_path / "r.json")
    findings = json.loads(out.read_text())["findings"]
    assert any(
        f["severity"] == "warning" and "site-1 sets min_cohort_size 1" in f["message"]
        for f in findings
    )


def test_rights_and_declines(report):
    rights = {(r["site_id"], r["kind"]): r for r in report["policy"]["rights"]}
    assert rights[("site-0", "erasure")]["count"] == 5
    assert rights[("site-0", "erasure")]["excluded_from_round"] == 1
    assert rights[("site-0", "consent")]["count"] == 7
    assert rights[("site-2", "erasure")]["count"] == "<5"
    assert report["policy"]["declines"] == []
    assert "GDPR-44-MODEL" in report["policy"]["denied_sites"]["site-3"]


def test_every_decision_by_rule_and_reference(run_dir, report):
    doc = json.loads(RunPaths(run_dir).decisions.read_text())
    server = lines(RunPaths(run_dir).server_log)
    logged = [e for e in server if e["action"] == "policy.run"]
    rows = report["policy"]["run_decisions"]
    assert len(rows) == len(doc["decisions"]) == len(logged) > 0
    assert all(r["references"] and r["rule_id"] for r in rows)
    deny = [r for r in rows if r["outcome"] == "deny"]
    assert [(r["rule_id"], r["site_id"]) for r in deny] == [("GDPR-44-MODEL", "site-3")]
    conflict = [r for r in rows if "conflict" in r["flags"]]
    assert [(r["rule_id"], r["site_id"]) for r in conflict] == [("DPDP-R6-1-e", "site-2")]
    site_rows = [r for r in report["policy"]["site_decisions"] if r["site_id"] == "site-0"]
    assert {r["rule_id"] for r in site_rows} == set(
        lines(site_log(run_dir, "site-0"))[1]["rule_ids"]
    )
    assert all(r["rounds"] == [1, 2] and r["outcome"] == "allow" for r in site_rows)


def test_audit_heads_and_receipts_equal_independent_verification(run_dir, report):
    logs = {lg["party"]: lg for lg in report["audit"]["logs"]}
    server_path = RunPaths(run_dir).server_log
    assert logs["server"]["head"] == str(verify_log(server_path).head)
    assert logs["server"]["status"] == "verified" and logs["server"]["key_pinned"]
    receipts = {}
    for e in lines(server_path):
        if e["action"] == "round.receipt":
            receipts.setdefault(e["details"]["site"], []).append(e["details"]["receipt"])
    anchors = json.loads(RunPaths(run_dir).summary.read_text())["anchors"]
    for site in SITES:  # the receipt of each site's run.anchor entry, held in summary.json
        receipts[site].append(anchors[site])
    for site in SITES:
        lg = logs[site]
        result = verify_log(
            site_log(run_dir, site),
            public_key=RunPaths(run_dir).site(site).audit_pubkey,
            receipts=receipts[site],
        )
        assert result.ok and lg["status"] == "verified" and lg["key_pinned"]
        assert lg["head"] == str(result.head) and lg["entries"] == result.entries
        assert sorted(r["receipt"] for r in lg["receipts"]) == sorted(receipts[site])
        assert all(r["ok"] for r in lg["receipts"])
    assert len(logs["server"]["receipts"]) >= 3  # the server heads each site logged, + summary
    assert logs["site-3"]["status"] == "missing"  # denied, never trained: not a failure
    assert all(c["ok"] for c in report["audit"]["cross_checks"])


def test_records_of_processing_dpia_and_dpdp(report):
    records = report["records_of_processing"]
    assert records[0]["party"]["role"].startswith("controller (coordinating")
    site2 = next(r for r in records if r["party"]["site_id"] == "site-2")
    measures = {m["measure"]: m for m in site2["measures"]}
    assert measures["Transport encryption (TLS)"]["detail"].startswith(
        "not applicable: simulation on one machine"
    )
    assert measures["Secure aggregation"]["status"] == "off"
    assert "epsilon" in measures["Differential privacy (sample level)"]["detail"]
    assert any("SCC-2021/914-C2C" in t["ground"] for t in site2["transfers"])
    assert {x["category"] for x in site2["data_categories"]} == {"health"}
    assert any(x["item"] == "site audit log" and x["days"] == 200 for x in site2["retention"])
    risks = {x["risk"] for x in report["dpia"]["risks"]}
    assert {
        "Leakage from model updates; membership inference",
        "Cross-border aggregation",
        "Erasure and consent withdrawal on trained models",
    } <= risks
    assert report["dpia"]["required"].startswith("likely required")
    dpdp = report["dpdp"]["sites"]
    assert [d["site_id"] for d in dpdp] == ["site-2"]
    assert dpdp[0]["ground"] == "consent" and dpdp[0]["log_retention_conflict"] is True
    # DPDP-9-1 (5 17-year-olds) + GDPR-MINORS (3 under-16s, "<5"): the sum is withheld
    assert dpdp[0]["children_excluded"] == "withheld"


def test_learning_results_with_baseline(run_dir, report):
    metrics = lines(RunPaths(run_dir).metrics)
    points = report["learning"]["points"]
    assert [p["round"] for p in points] == [0, 1, 2]
    assert [p["adapted"] for p in points] == [m["eval"]["adapted"] for m in metrics]
    assert [p["unadapted"] for p in points] == [m["eval"]["unadapted"] for m in metrics]
    assert report["learning"]["baseline_points"] == points  # the run given as its own baseline
    assert report["run"]["model_sha256"] == metrics[-1]["model_sha256"]


def test_site_report_holds_no_other_site(run_dir, tmp_path):
    for fmt in ("json", "md", "html"):
        path = write_report(run_dir, fmt, out=tmp_path / f"site-2.{fmt}", site="site-2")
        text = path.read_text()
        assert "site-2" in text
        for other in OTHERS:
            assert other not in text, (fmt, other)
    doc = json.loads((tmp_path / "site-2.json").read_text())
    assert doc["scope"] == {"kind": "site", "site_id": "site-2"}
    assert [p["site_id"] for p in doc["privacy"]] == ["site-2"]
    assert {lg["party"] for lg in doc["audit"]["logs"]} == {"server", "site-2"}
    assert doc["checks_passed"] is True and doc["verified"] is False  # no --trust


def test_markdown_links_its_plots(run_dir, tmp_path):
    path = write_report(run_dir, "md", out=tmp_path / "r.md")
    text = path.read_text()
    assert text.startswith("**SELF-ASSERTED EVIDENCE")  # no --trust: said on line 1
    assert "\n# Compliance report" in text
    for name in ("r-epsilon.png", "r-learning.png"):
        assert f"]({name})" in text and (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert "| site-0 | `GDPR-MINORS` | GDPR Art. 9(4); GDPR Art. 89(1) | <5 |" in text


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (make test installs Debian's chromium)")
    return exe


def _chromium_args(profile: Path) -> list[str]:
    return [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ]


@pytest.mark.browser
def test_html_is_one_self_contained_file_that_chromium_renders(html, tmp_path):
    text = html.read_text()
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", text)  # no external asset
    assert "@media print" in text and text.count("data:image/png;base64,") == 2
    dom = subprocess.run(
        [*_chromium_args(tmp_path / "p1"), "--dump-dom", html.as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    for needle in (
        "Record of processing (GDPR Art. 30)",
        "DPIA-ready summary",
        "Privacy statement per site",
        "India: DPDP Act 2023",
        "Audit log verification",
        "all logs verified against trusted keys",
        "&lt;5",
        "GDPR-MINORS",
    ):
        assert needle in dom.stdout, needle
    assert 'id="unverified-banner"' not in dom.stdout
    png = tmp_path / "shot.png"
    shot = subprocess.run(
        [
            *_chromium_args(tmp_path / "p2"),
            f"--screenshot={png}",
            "--window-size=1280,2000",
            html.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shot.returncode == 0 and png.exists(), shot.stderr[-2000:]
    from PIL import Image

    with Image.open(png) as img:
        gray = img.convert("L")
        hist = gray.histogram()
        dark = sum(hist[:128]) / (gray.width * gray.height)
    assert 0.005 < dark < 0.5  # text on a white page: not blank, not black
    assert sum(1 for n in hist if n) > 50  # anti-aliased text and coloured badges


def test_tampered_log_refuses_and_allow_unverified_shows_the_banner(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("report*"))
    log = site_log(run, "site-1")
    data = bytearray(log.read_bytes())
    at = data.index(b'"examples":') + len(b'"examples":')
    data[at] = ord("3") if data[at] != ord("3") else ord("4")  # one byte of a count
    log.write_bytes(bytes(data))
    res = fedmeta("report", str(run), isolate=False)
    assert res.returncode == 1
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "sites/site-1/audit/audit-log.jsonl" in err[0], res.stderr
    assert not list(run.glob("report*"))
    text = write_report(run, "html", allow_unverified=True).read_text()
    body = text[text.index("<body>") :]
    assert re.match(
        r'<body>\s*<p class="banner" id="evidence-basis">SELF-ASSERTED[^<]*</p>\s*'
        r'<div class="banner" id="unverified-banner"',
        body,
    )
    assert "sites/site-1/audit/audit-log.jsonl" in body[:2000]
    for fmt in ("json", "md"):
        write_report(run, fmt, out=tmp_path / f"u.{fmt}", allow_unverified=True)
    doc = json.loads((tmp_path / "u.json").read_text())
    assert doc["verified"] is False and "UNVERIFIED" in doc["unverified_warning"]
    md = (tmp_path / "u.md").read_text().splitlines()
    assert md[0].startswith("**SELF-ASSERTED") and md[2].startswith("> **UNVERIFIED")


def test_user_errors_are_one_line_with_exit_2(run_dir, tmp_path):
    for args in (["--site", "site-9"], ["--format", "pdf"], ["--baseline", str(tmp_path)]):
        res = fedmeta("report", str(run_dir), *args, isolate=False)
        assert res.returncode == 2, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    res = fedmeta("report", str(tmp_path / "missing"), isolate=False)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
