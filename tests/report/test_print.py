"""The 10-site demo report as a DPO reads it: page one first, grouped findings, annexes,
and at most 15 A4 pages when Chromium prints it (the page budget)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import fedmeta

from fedmeta.report import build_report, write_report
from fedmeta.report.model import Finding, SitePrivacy
from fedmeta.report.summary import group_findings, plain
from policies import RULES

PAGE_BUDGET = 15
SITES = [f"site-{i}" for i in range(10)]


def pdf_pages(pdf: bytes) -> int:
    """Pages of a PDF: the /Count of its root page tree (the /Pages without a /Parent),
    checked against the number of /Type /Page leaves."""
    objects = re.findall(rb"\d+ 0 obj(.*?)endobj", pdf, re.S)  # Chromium: no object streams
    roots = [o for o in objects if re.search(rb"/Type\s*/Pages\b", o) and b"/Parent" not in o]
    leaves = sum(len(re.findall(rb"/Type\s*/Page(?![s\w])", o)) for o in objects)
    assert len(roots) == 1, "no single root page tree"
    count = int(re.search(rb"/Count\s+(\d+)", roots[0]).group(1))
    assert count == leaves, (count, leaves)
    return count


def print_to_pdf(html: Path, out: Path, profile: Path) -> bytes:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (make test installs Debian's chromium)")
    res = subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--no-pdf-header-footer",
            f"--print-to-pdf={out}",
            html.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 0 and out.exists(), res.stderr[-2000:]
    return out.read_bytes()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo run `make run` makes (default config: 10 sites, 30 rounds), in process."""
    out = tmp_path_factory.mktemp("demo") / "run"
    res = fedmeta("simulate", "--out", str(out), "--backend", "inline", isolate=False, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.browser
def test_the_ten_site_demo_report_prints_within_the_page_budget(demo, tmp_path):
    html = write_report(demo, "html", out=tmp_path / "report.html")
    text = html.read_text()
    pages = pdf_pages(print_to_pdf(html, tmp_path / "report.pdf", tmp_path / "profile"))
    print(f"demo report: {pages} A4 pages")
    assert pages <= PAGE_BUDGET, pages
    # page footers: report id, run id, page number (CSS page-margin boxes)
    report_id = re.search(r"Report <strong class=\"mono\">(R-[0-9a-f]{10})</strong>", text)
    assert report_id is not None
    footer = re.search(r"@bottom-left \{ content: \"([^\"]*)\"", text).group(1)
    assert report_id.group(1) in footer and str(demo) not in footer
    assert re.search(r"run \d{8}T\d{6}Z-[0-9a-f]{6}", footer)
    assert 'counter(page) " of " counter(pages)' in text
    # no forced break but the one after page one: no half-empty pages between sections
    css = text[text.index("@media print") : text.index("</style>")]
    assert css.count("break-before: page") == 0 and css.count("break-after: page") == 1
    assert ".record { break-inside: avoid" not in css


@pytest.mark.slow
def test_the_demo_report_reads_as_a_dpo_needs(demo, tmp_path):
    report = build_report(demo)
    html = write_report(demo, "html", out=tmp_path / "r.html").read_text()
    body = html[html.index("<body>") :]
    # page one: verdict, top findings in plain words, sign-off, before section 1
    summary = body[body.index('id="summary-page"') : body.index('id="findings"')]
    assert report.summary is not None
    assert report.summary.verdict == "GO WITH CONDITIONS"  # self-asserted keys in a simulation
    assert f'id="verdict">{report.summary.verdict}<' in summary
    assert 1 <= len(report.summary.top_findings) <= 5
    assert not any(
        re.search(r"\b(GDPR|DPDP|PRIV)-[A-Z0-9]", x) or re.search(r"[0-9a-f]{32}", x)
        for x in report.summary.top_findings
    )
    assert report.summary.top_findings[0].startswith(
        "The audit logs were checked only against keys found in the run directory"
    )
    for role in ("Data protection officer", "Controller (coordinator)", "Review owner"):
        assert role in summary
    assert "DPIA-EXAMPLE-2025-001 v2" in summary and "gate: passed" in summary
    # repeated findings are grouped: one line for eleven self-asserted logs
    assert sum("intact only under" in f.message for f in report.findings) == 1
    # the party registry names every site's party: no name-matching Art. 26 guess, and
    # the registered parties of this run all name a DPO
    assert not any(
        "not named among the run's controllers" in f.message or "names no DPO" in f.message
        for f in report.findings
    )
    # shared measures once; the sites' records as one table
    assert body.count("measures shared by every site") == 1
    assert "Records of the 10 sites" in body
    assert body.count("Example Research Consortium (coordinating university hospital), DE;") <= 2
    # decisions equal at every site shown once
    assert body.count("all 10 sites") >= 5
    assert len(report.policy.site_decision_groups) < len(report.policy.site_decisions) / 5
    # a plain sentence per site, and the warning level
    for p in report.privacy:
        assert p.plain.startswith(f"{p.site_id}: epsilon ") and "times more sure" in p.plain
    assert report.epsilon_warn == 4.0
    # the annex lists every rule with its provision, check, interpretation flag, status
    annex = {row.rule_id: row for row in report.rules}
    assert set(RULES) <= set(annex) and "PRIV-BUDGET" in annex
    assert annex["GDPR-MINORS"].interpretation and not annex["GDPR-8"].interpretation
    assert annex["DPDP-8-7"].legal_status.startswith("readiness")
    assert annex["GDPR-35"].references[0] == "GDPR Art. 35(1)"
    annex_html = body[body.index('id="annex-rules"') : body.index('id="learning"')]
    for rule_id in RULES:
        assert f">{rule_id}<" in annex_html, rule_id
    # hashes, learning curves and audit detail sit in the annexes, after the rule annex
    first_annex = body.index('id="annex-rules"')
    assert body.index(report.run.model_sha256) > first_annex
    assert body.index('alt="Adapted and un-adapted') > first_annex
    assert body.index('id="audit"') > first_annex
    assert body.index('alt="Privacy budget per site') < first_annex  # the bars stay in §5


@pytest.mark.slow
def test_epsilon_and_delta_warnings(demo):
    report = build_report(demo, epsilon_warn=1.0)
    assert all(
        any("above the warning level 1" in w for w in p.warnings) for p in report.privacy if p.dp
    )
    assert any("spent more than epsilon 1 in this run" in f.message for f in report.findings)
    relaxed = build_report(demo, epsilon_warn=100.0)
    assert not any(p.warnings for p in relaxed.privacy)  # delta 1e-5 < 1/n here


def test_delta_above_one_over_n_is_a_warning():
    from fedmeta.report.privacy import with_plain_language

    report_privacy = SitePrivacy(
        site_id="site-0",
        dp=True,
        privacy_unit="one record",
        accountant="prv",
        delta=0.05,
        epsilon_run=1.0,
        epsilon_total=1.0,
        epsilon_max=10.0,
        budget_left=9.0,
        noise_multipliers=[1.0],
        sample_rates=[0.1],
        steps_per_round=[8],
        steps_total=8,
        clip_norm=1.0,
        rounds_joined=[1],
        rounds_declined=[],
        earlier_charges=0,
        statement="s",
        points=[],
    )
    small = with_plain_language(report_privacy, 50, 4.0)
    assert len(small.warnings) == 1 and "above 1/n = 0.02" in small.warnings[0]
    assert not with_plain_language(report_privacy, 10, 4.0).warnings  # 0.05 < 1/10
    assert not with_plain_language(report_privacy, "<5", 4.0).warnings  # suppressed count
    assert "2.72 times more sure" in small.plain


def test_findings_that_differ_only_in_the_site_are_grouped():
    findings = [
        Finding(
            severity="warning",
            section="policy",
            message=f"{s}: 2 data-subject request(s) answered late",
        )
        for s in SITES
    ]
    findings.append(
        Finding(
            severity="warning",
            section="policy",
            message="site-3: 5 data-subject request(s) answered late",
        )
    )
    grouped = group_findings(findings, SITES)
    assert [f.message for f in grouped] == [
        "10 sites (" + ", ".join(SITES) + "): 2 data-subject request(s) answered late",
        "site-3: 5 data-subject request(s) answered late",
    ]
    assert grouped[0].sites == SITES and grouped[1].sites == []
    # "site-1" is not grouped into "site-10"
    two = group_findings(
        [
            Finding(severity="info", section="x", message="site-1 ok"),
            Finding(severity="info", section="x", message="site-10 ok"),
        ],
        ["site-1", "site-10"],
    )
    assert [f.message for f in two] == ["2 sites (site-1, site-10): each ok"]
    assert (
        plain(
            Finding(
                severity="error", section="policy", message="the run was refused (GDPR-35): no DPIA"
            )
        )
        == "the run was refused: no DPIA"
    )
