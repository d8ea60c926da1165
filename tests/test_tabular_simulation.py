"""An institution's own CSV data in a real simulated federation (task tabular-csv; the
in-process grid with the real ServerApp and ClientApp)."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import clinic_manifest, run_inline

from fedmeta.data.csv_loader import load_csv
from fedmeta.data.tasks import TaskError, get_task
from fedmeta.paths import RunPaths, SitePaths
from fedmeta.site import Site
from policies import suppress_small_counts

EXAMPLES = __import__("fedmeta.data", fromlist=["x"]).__path__[0] + "/examples"
FEATURES = '["age_band", "bmi", "glucose"]'


HEADER = [
    "pid",
    "ward",
    "age",
    "age_band",
    "bmi",
    "glucose",
    "diagnosis",
    "consent",
    "withdrawn",
    "guardian_ok",
    "collected",
    "erasure",
    "note",
]


def constructed_rows(
    site: int, plan: dict[str, int], normal: int = 20, dropped: int = 3
) -> list[dict[str, str]]:
    """Rows built to trigger exactly ``plan`` (rule id -> count): erasure requests
    (GDPR-17), children without a guardian's consent (GDPR-MINORS), records older than the
    10-year retention (GDPR-5-1-e), plus ``normal`` rows that pass and ``dropped`` rows
    with an empty feature, which the loader drops before any rule (they carry an
    erasure request that must not be counted)."""
    now = datetime.now(UTC)
    recent = (now - timedelta(days=200)).date().isoformat()
    old = (now - timedelta(days=11 * 365)).date().isoformat()
    kinds = (
        [None] * normal
        + ["GDPR-17"] * plan.get("GDPR-17", 0)
        + ["GDPR-MINORS"] * plan.get("GDPR-MINORS", 0)
        + ["GDPR-5-1-e"] * plan.get("GDPR-5-1-e", 0)
        + ["dropped"] * dropped
    )
    rows = []
    for i, kind in enumerate(kinds):
        child = kind == "GDPR-MINORS"
        rows.append(
            {
                "pid": f"S{site}-{i:03d}",
                "ward": ("general", "cardiology")[i % 2],
                "age": "12" if child else str(30 + i),
                "age_band": "1" if child else str(3 + i % 5),
                "bmi": "" if kind == "dropped" else f"{20 + (i % 9) * 1.5:.1f}",
                "glucose": f"{4.5 + (i % 7) * 0.4:.2f}",
                "diagnosis": ("benign", "malignant")[i % 2],
                "consent": "research",
                "withdrawn": "",
                "guardian_ok": "false" if child else "",
                "collected": old if kind == "GDPR-5-1-e" else recent,
                "erasure": "true" if kind in ("GDPR-17", "dropped") else "",
                "note": kind or "",
            }
        )
    return rows


PLANS = [{"GDPR-17": 2, "GDPR-MINORS": 3, "GDPR-5-1-e": 1}, {"GDPR-5-1-e": 4}, {"GDPR-17": 1}]


def test_sites_train_on_their_own_csv_and_minimisation_is_enforced(tmp_path):
    out = tmp_path / "run"
    for i, plan in enumerate(PLANS):
        site = RunPaths(out).site(f"site-{i}").root
        site.mkdir(parents=True)
        with open(site / "data.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=HEADER)
            writer.writeheader()
            writer.writerows(constructed_rows(i, plan))
        (site / "schema.toml").write_text(Path(f"{EXAMPLES}/cohort.schema.toml").read_text())
        declared = FEATURES if i < 2 else '["age_band", "bmi"]'  # site-2 reads more than declared
        SitePaths(site).manifest.write_text(clinic_manifest(f"site-{i}", declared))
    # ~25 records a site: noise 3 keeps each round well inside the run's declared epsilon
    run_inline(
        out,
        task="tabular-csv",
        sites=3,
        rounds=2,
        features=3,
        classes=2,
        fraction_train=1.0,
        epsilon_max=20,
        noise_multiplier=3.0,
    )
    lines = [json.loads(x) for x in RunPaths(out).metrics.read_text().splitlines()]
    for line in lines[1:]:
        assert line["used"] == ["site-0", "site-1"]
        assert "GDPR-5-1-c" in line["declined"]["site-2"]
        for i in (0, 1):
            # counts leave the site suppressed below its minimum cohort size (5)
            released = suppress_small_counts(PLANS[i], 5)
            assert line["exclusions"].get(f"site-{i}", {}) == released
    assert "eval" not in lines[-1]  # the server holds no data of a CSV federation


def test_tabular_task_checks_the_agreed_shape(tmp_path):
    from fedmeta.config import RunConfig

    records, _ = load_csv(f"{EXAMPLES}/cohort.csv", f"{EXAMPLES}/cohort.schema.toml")
    (tmp_path / "data.csv").write_text(Path(f"{EXAMPLES}/cohort.csv").read_text())
    (tmp_path / "schema.toml").write_text(Path(f"{EXAMPLES}/cohort.schema.toml").read_text())
    with pytest.raises(TaskError, match="feature columns"):
        Site("site-0", 0, tmp_path, RunConfig(task="tabular-csv", features=5))
    site = Site("site-0", 0, tmp_path, RunConfig(task="tabular-csv", features=3))
    assert len(site.records) == len(records) and site.read_columns == ("age_band", "bmi", "glucose")
    with pytest.raises(TaskError, match="features"):
        get_task("tabular-csv")
