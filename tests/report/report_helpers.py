"""Build one small but policy-rich simulated run for the report tests.

Four sites, two rounds, a consent-based run declaration:

* ``site-0`` (DE, GDPR) has constructed exclusions, one of them below the
  minimum cohort size (``GDPR-8``: 4 records, shown as "<5");
* ``site-1`` (DE, GDPR) has none;
* ``site-2`` (IN, GDPR + DPDP, SCC) keeps logs 200 days: the GDPR/DPDP
  log-retention conflict; it has erasure requests, withdrawals and 17-year-olds
  (DPDP children);
* ``site-3`` (CN, no SCC) is denied at run level (never trained).

Usable as a script too: ``python tests/report/report_helpers.py OUT_DIR``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime.now(UTC)
PURPOSE = "research.model-training"

SITE0 = {"GDPR-17": 5, "GDPR-7-3": 7, "GDPR-8": 4, "GDPR-5-1-e": 6}
SITE2 = {"GDPR-17": 3, "GDPR-7-3": 6, "DPDP-9-1": 5}
AGE = {"GDPR-8": "12", "DPDP-9-1": "17"}


def consent_declaration(path: Path) -> Path:
    from policies import EXAMPLE_RUN

    text = EXAMPLE_RUN.read_text()
    text = text.replace('lawful_basis = "e"', 'lawful_basis = "a"')
    text = text.replace('special_category_condition = "j"', 'special_category_condition = "a"')
    path.write_text(text)
    return path


def manifest(site_id: str, country: str = "DE", safeguards: str = "[]",
             packs: str = '["gdpr"]', extra: str = "", log_days: int = 730) -> str:
    return f"""
site_id = "{site_id}"
institution = "Hospital {site_id}"
country = "{country}"
role = "joint-controller"
data_categories = ["health"]
data_subjects = ["patients", "minors"]
approved_purposes = ["{PURPOSE}"]
lawful_basis = "a"
retention_days = 3650
log_retention_days = {log_days}
transfer_safeguards = {safeguards}
epsilon_max = 10.0
delta = 1e-5
law_packs = {packs}
{extra}
"""


def write_site(root: Path, index: int, text: str, plan: dict[str, int] | None = None,
               num_sites: int = 4) -> Path:
    from fedmeta.data.tasks import get_task

    site_dir = root / "sites" / f"site-{index}"
    site_dir.mkdir(parents=True)
    (site_dir / "manifest.toml").write_text(text)
    ids = get_task("digits-fewshot", num_sites=num_sites).site_records(index).record_ids
    rows = ["record_id,consented_purposes,consent_withdrawn_at,age,guardian_consent,"
            "collected_at,erasure_requested"]
    old = (NOW - timedelta(days=20 * 365)).date().isoformat()
    recent = (NOW - timedelta(days=300)).date().isoformat()
    withdrawn = (NOW - timedelta(days=3)).date().isoformat()
    kinds: list[str] = []
    for rule, n in (plan or {}).items():
        kinds += [rule] * n
    for i, rid in enumerate(ids):
        kind = kinds[i] if i < len(kinds) else None
        rows.append(",".join([
            rid, PURPOSE, withdrawn if kind == "GDPR-7-3" else "", AGE.get(kind or "", "40"),
            "false", old if kind == "GDPR-5-1-e" else recent,
            "true" if kind == "GDPR-17" else "false"]))
    (site_dir / "records-meta.csv").write_text("\n".join(rows) + "\n")
    return site_dir


def build_run(out: Path, declaration_dir: Path) -> subprocess.CompletedProcess[str]:
    """Write the sites' manifests and metadata, then simulate 2 rounds with the real CLI."""
    write_site(out, 0, manifest("site-0"), SITE0)
    write_site(out, 1, manifest("site-1"))
    write_site(out, 2, manifest("site-2", "IN", '["SCC-2021/914-C2C"]', '["gdpr", "dpdp"]',
                                'dpdp_ground = "consent"', log_days=200), SITE2)
    write_site(out, 3, manifest("site-3", "CN"))
    decl = consent_declaration(declaration_dir / "run.toml")
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    from helpers import fedmeta

    return fedmeta("simulate", "--sites", "4", "--rounds", "2", "--out", str(out),
                   "--set", "fraction-train=1.0", "--set", "eval-every=1",
                   "--set", "eval-episodes=3", "--set", f"declaration={decl}")


if __name__ == "__main__":
    target = Path(sys.argv[1]).resolve()
    target.mkdir(parents=True, exist_ok=False)
    os.chdir(ROOT)
    res = build_run(target, target.parent)
    print(res.stdout[-2000:], res.stderr[-2000:] if res.returncode else "")
    sys.exit(res.returncode)
