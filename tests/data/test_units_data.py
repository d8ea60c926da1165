"""Privacy units in the data: digits' rotations share their image, a CSV names a unit column."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmeta.config import RunConfig, build_task, run_declaration
from fedmeta.data.csv_loader import DataError, load_csv, parse_schema
from fedmeta.data.tasks.digits import DigitsFewShot, _all_digits
from fedmeta.paths import LEDGER_FILE
from fedmeta.paths import SITE_AUDIT_LOG as AUDIT_LOG
from fedmeta.privacy.budget import poisson_rate
from fedmeta.privacy.ledger import LedgerError, PrivacyLedger
from fedmeta.site import Site, load_manifest

SCHEMA = """\
[dataset]
name = "cohort"
task = "classification"
label = "y"
features = ["a", "b"]
classes = ["no", "yes"]
{unit}
"""


def test_digits_rotations_of_one_image_share_a_unit():
    task = DigitsFewShot(num_sites=5)
    x_all, _ = _all_digits()
    n_images = len(x_all) // 4
    seen_multi = 0
    for site in range(5):
        records = task.site_records(site)
        assert records.units is not None and len(records.units) == len(records)
        idx = np.array([int(r.split("-")[1]) for r in records.record_ids])
        assert (records.units == idx % n_images).all()
        for u in np.unique(records.units):
            members = np.flatnonzero(records.units == u)
            assert len(members) <= 4
            seen_multi += len(members) > 1
            base = records.x[members[0], 0]
            for m in members[1:]:  # every member is a rotation of the same image
                assert any(np.array_equal(records.x[m, 0], np.rot90(base, k=k)) for k in range(4))
            # the 4 rotations fall in 4 different classes (d, d+10, d+20, d+30)
            assert len(set(records.y[members] % 10)) == 1
            assert len(set(records.y[members])) == len(members)
    assert seen_multi > 0  # some site holds several rotations of one image
    pool = task.episode_pool(task.site_records(0), np.random.default_rng(0))
    assert pool.units is not None and len(pool.units) == len(pool.x)
    assert task.supervised_pool(task.site_records(0)).units is not None


def _csv(path: Path, rows: list[str]) -> Path:
    path.write_text("pid,patient_id,a,b,y\n" + "\n".join(rows) + "\n")
    return path


def test_a_csv_unit_column_fills_units_without_keeping_the_ids(tmp_path):
    schema = parse_schema(SCHEMA.format(unit='unit_column = "patient_id"'))
    rows = ["r1,P-9,1,2,no", "r2,P-1,1,3,yes", "r3,P-9,0,2,yes", "r4,P-5,2,2,no"]
    records, report = load_csv(_csv(tmp_path / "d.csv", rows), schema)
    assert records.units.dtype == np.int64 and records.units.tolist() == [2, 0, 2, 1]
    assert "patient_id" in report.columns_read
    plain, _ = load_csv(tmp_path / "d.csv", parse_schema(SCHEMA.format(unit="")))
    assert plain.units is None


@pytest.mark.parametrize(
    "unit, needle",
    [
        ('unit_column = "a"', "also a feature"),
        ('unit_column = "y"', "label column"),
        ('unit_column = ""', "empty"),
    ],
)
def test_a_bad_unit_column_is_a_one_line_error(unit, needle):
    with pytest.raises(DataError, match=needle) as info:
        parse_schema(SCHEMA.format(unit=unit))
    assert "\n" not in str(info.value)


def test_an_empty_unit_cell_is_a_one_line_error(tmp_path):
    schema = parse_schema(SCHEMA.format(unit='unit_column = "patient_id"'))
    with pytest.raises(
        DataError, match=r"line 3, column 'patient_id'.*every row must name"
    ) as info:
        load_csv(_csv(tmp_path / "d.csv", ["r1,P1,1,2,no", "r2,,1,2,no"]), schema)
    assert "\n" not in str(info.value)


def test_a_csv_site_accounts_per_patient(tmp_path):
    """A site whose schema names patient_id samples patients: q = 1/ceil(patients/B), the
    ledger and the signed round.train entry say per patient_id."""
    site_dir = tmp_path / "site-0"
    site_dir.mkdir()
    rng = np.random.default_rng(0)
    rows = [
        f"r{i},P{i // 3},{rng.normal():.3f},{rng.normal():.3f},{'yes' if i % 2 else 'no'}"
        for i in range(90)
    ]  # 30 patients, 3 records each
    _csv(site_dir / "data.csv", rows)
    (site_dir / "schema.toml").write_text(SCHEMA.format(unit='unit_column = "patient_id"'))
    cfg = RunConfig(
        task="tabular-csv",
        features=2,
        classes=2,
        sites=2,
        inner_steps=3,
        batch_size=8,
        out_dir=str(tmp_path),
    )
    manifest = load_manifest(site_dir, "site-0", cfg).model_copy(
        update={"feature_columns": ("a", "b")}
    )  # data minimisation: what the trainer reads
    site = Site("site-0", 0, site_dir, cfg, manifest=manifest, simulated=True)
    assert site.privacy_unit == "patient_id"
    t = build_task(cfg)
    torch.manual_seed(0)
    theta = t.build_model(t.out_dim(cfg.strategy)).state_dict()
    reply = site.train_round(theta, "run-u", 1, run_declaration(cfg))
    assert not reply.declined, reply.reason
    ledger = PrivacyLedger.read(site_dir / LEDGER_FILE)
    assert ledger.privacy_unit == "patient_id" and ledger.summary()["privacy_unit"] == "patient_id"
    assert ledger.charges[-1].sample_rate == poisson_rate(30, 8) == 0.25  # not 1/ceil(90/8)
    train = [
        json.loads(x)
        for x in (site_dir / AUDIT_LOG).read_text().splitlines()
        if '"round.train"' in x
    ][-1]
    assert train["details"]["privacy_unit"] == "patient_id"
    assert train["details"]["sample_rate"] == 0.25
    # the ledger is kept per patient: data that drop the unit column cannot reuse it
    (site_dir / "schema.toml").write_text(SCHEMA.format(unit=""))
    with pytest.raises(LedgerError, match="kept per 'patient_id'.*'record'"):
        again = Site("site-0", 0, site_dir, cfg, manifest=manifest, simulated=True)
        again.train_round(theta, "run-u", 2, run_declaration(cfg))
