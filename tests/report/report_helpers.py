"""Build one small but policy-rich simulated run for the report tests.

Four sites, two rounds, a consent-based run declaration:

* ``site-0`` (DE, GDPR) has constructed exclusions, one of them below the
  minimum cohort size (``GDPR-MINORS``: 4 records, shown as "<5");
* ``site-1`` (DE, GDPR) has none;
* ``site-2`` (IN, GDPR + DPDP, SCC) keeps logs 200 days: the GDPR/DPDP
  log-retention conflict; it has erasure requests, withdrawals, 17-year-olds
  (DPDP children: 5) and 3 under-16s (minors under the site's national law,
  minor_age 16: GDPR-MINORS, shown "<5"): the children total 8 must be
  withheld, else 8 - 5 gives the suppressed 3 away;
* ``site-3`` (CN, no SCC) is denied at run level (never trained).

Usable as a script too: ``python tests/report/report_helpers.py OUT_DIR``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))
from helpers import consent_declaration, manifest, write_site  # noqa: E402

SITE0 = {"GDPR-17": 5, "GDPR-7-3": 7, "GDPR-MINORS": 4, "GDPR-5-1-e": 6}
SITE2 = {"GDPR-17": 3, "GDPR-7-3": 6, "GDPR-MINORS": 3, "DPDP-9-1": 5}


def build_run(out: Path, declaration_dir: Path) -> subprocess.CompletedProcess[str]:
    """Write the sites' manifests and metadata, then simulate 2 rounds with the real CLI
    (in-process backend: the report reads a run's files, not how sites were reached)."""
    write_site(out, 0, manifest("site-0"), SITE0)
    write_site(out, 1, manifest("site-1"))
    write_site(
        out,
        2,
        manifest(
            "site-2",
            "IN",
            '["SCC-2021/914-C2C"]',
            '["gdpr", "dpdp"]',
            'dpdp_ground = "consent"\nminor_age = 16',
            log_days=200,
        ),
        SITE2,
    )
    write_site(out, 3, manifest("site-3", "CN"))
    decl = consent_declaration(declaration_dir / "run.toml")
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    from helpers import fedmeta

    return fedmeta(
        "simulate",
        "--sites",
        "4",
        "--rounds",
        "2",
        "--out",
        str(out),
        "--set",
        "fraction-train=1.0",
        "--set",
        "eval-every=1",
        "--set",
        "eval-episodes=3",
        "--set",
        f"declaration={decl}",
        "--backend",
        "inline",
        isolate=False,
    )


if __name__ == "__main__":
    target = Path(sys.argv[1]).resolve()
    target.mkdir(parents=True, exist_ok=False)
    os.chdir(ROOT)
    res = build_run(target, target.parent)
    print(res.stdout[-2000:], res.stderr[-2000:] if res.returncode else "")
    sys.exit(res.returncode)
