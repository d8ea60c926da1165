"""An institution's own CSV data in a real simulated federation (task tabular-csv)."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import fedmeta

from fedmeta.data.csv_loader import load_csv
from fedmeta.data.tasks import TaskError, get_task
from fedmeta.site import Site, release_counts
from policies import EXAMPLE_RUN

pytestmark = pytest.mark.slow

EXAMPLES = __import__("fedmeta.data", fromlist=["x"]).__path__[0] + "/examples"
FEATURES = '["age_band", "bmi", "glucose"]'


def manifest(site_id, features):
    return f"""
site_id = "{site_id}"
institution = "Clinic {site_id}"
country = "DE"
role = "joint-controller"
data_categories = ["health"]
data_subjects = ["patients", "minors"]
approved_purposes = ["research.model-training"]
lawful_basis = "e"
retention_days = 3650
log_retention_days = 730
epsilon_max = 20.0
delta = 1e-5
law_packs = ["gdpr"]
feature_columns = {features}
"""


def expected_exclusions(rows):
    """Counted by hand from the CSV: erasure first, then children, then retention."""
    now = datetime.now(UTC)
    out = {}
    for row in rows:
        if not all(row[c] for c in ("age_band", "bmi", "glucose")):
            continue  # dropped by the loader (missing = "drop-row"), never seen by the rules
        if row["erasure"].strip().lower() not in ("", "false", "0", "no"):
            rule = "GDPR-17"
        elif (row["age"] and int(row["age"]) < 16
              and row["guardian_ok"].strip().lower() not in ("true", "1", "yes", "y")):
            rule = "GDPR-8"
        elif row["collected"] and (now - datetime.fromisoformat(row["collected"]).replace(
                tzinfo=UTC)) > timedelta(days=3650):
            rule = "GDPR-5-1-e"
        else:
            continue
        out[rule] = out.get(rule, 0) + 1
    return out


def test_sites_train_on_their_own_csv_and_minimisation_is_enforced(tmp_path):
    with open(f"{EXAMPLES}/cohort.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        header, rows = reader.fieldnames, list(reader)
    out = tmp_path / "run"
    parts = [rows[0:20], rows[20:40], rows[40:60]]
    for i, part in enumerate(parts):
        site = out / "sites" / f"site-{i}"
        site.mkdir(parents=True)
        with open(site / "data.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=header)
            writer.writeheader()
            writer.writerows(part)
        (site / "schema.toml").write_text(Path(f"{EXAMPLES}/cohort.schema.toml").read_text())
        declared = FEATURES if i < 2 else '["age_band", "bmi"]'  # site-2 reads more than declared
        (site / "manifest.toml").write_text(manifest(f"site-{i}", declared))
    # ~15 records a site and a batch of 10 (q = 0.5) spend ~9.4 a round: the run declares
    # 20, which the sites enforce per run (the example declaration's 8 would stop them)
    declaration = tmp_path / "run.toml"
    declaration.write_text(EXAMPLE_RUN.read_text().replace("epsilon = 8.0", "epsilon = 20.0"))
    res = fedmeta("simulate", "--task", "tabular-csv", "--sites", "3", "--rounds", "2",
                  "--out", str(out), "--set", "features=3", "--set", "classes=2",
                  "--set", "fraction-train=1.0", "--set", "epsilon-max=20",
                  "--set", f"declaration={declaration}")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for line in lines[1:]:
        assert line["used"] == ["site-0", "site-1"]
        assert "GDPR-5-1-c" in line["declined"]["site-2"]
        for i in (0, 1):
            # as released: counts below the minimum cohort size (5) leave as "<5"
            assert line["exclusions"].get(f"site-{i}", {}) == release_counts(
                expected_exclusions(parts[i]), 5)
    assert any(lines[1]["exclusions"].values())
    assert "eval" not in lines[-1]  # the server holds no data of a CSV federation


def test_tabular_task_checks_the_agreed_shape(tmp_path):
    from fedmeta.config import RunConfig

    records, _ = load_csv(f"{EXAMPLES}/cohort.csv", f"{EXAMPLES}/cohort.schema.toml")
    (tmp_path / "data.csv").write_text(Path(f"{EXAMPLES}/cohort.csv").read_text())
    (tmp_path / "schema.toml").write_text(Path(f"{EXAMPLES}/cohort.schema.toml").read_text())
    with pytest.raises(TaskError, match="feature columns"):
        Site("site-0", 0, tmp_path, RunConfig(task="tabular-csv", features=5))
    site = Site("site-0", 0, tmp_path, RunConfig(task="tabular-csv", features=3))
    assert len(site.records) == len(records) and site.read_columns == (
        "age_band", "bmi", "glucose")
    with pytest.raises(TaskError, match="features"):
        get_task("tabular-csv")
