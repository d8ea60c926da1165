"""A tabular federation whose sites keep their CSVs in their own folders (the run's
``data-dir``, never copied into the run directory), evaluated leave-sites-out: the
site folders beyond the training sites never train and are what the server and
`fedmeta evaluate` adapt and score on. A new site then adapts and predicts on an
unlabelled CSV (no label column)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from helpers import clinic_manifest, fedmeta, run_inline

from fedmeta.paths import RunPaths

SCHEMA = """
[dataset]
name = "cohort"
task = "classification"
label = "diagnosis"
features = ["age_band", "bmi", "glucose"]
classes = ["benign", "malignant"]
standardise = true

[columns]
record_id = "pid"
"""


def write_site(folder: Path, seed: int, n: int = 60, label: bool = True) -> None:
    """Synthetic patients; each site measures on its own scale (offsets differ)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    (folder / "schema.toml").write_text(SCHEMA)
    offset = rng.normal(0, 3, size=3)
    with open(folder / "data.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["pid", "age_band", "bmi", "glucose"] + (["diagnosis"] if label else []))
        for i in range(n):
            sick = i % 2
            x = rng.normal(0, 1, size=3) + 1.5 * sick + offset
            w.writerow(
                [f"S{seed}-{i}", *[f"{v:.3f}" for v in x]]
                + ([("benign", "malignant")[sick]] if label else [])
            )


def test_held_out_sites_evaluate_and_a_new_site_predicts(tmp_path):
    data = tmp_path / "hospital-data"
    for i in range(5):  # 3 training sites, 2 held out (validation, test)
        write_site(data / f"site-{i}", seed=i)
    out = tmp_path / "run"
    for i in range(3):
        RunPaths(out).site(f"site-{i}").root.mkdir(parents=True)
        RunPaths(out).site(f"site-{i}").manifest.write_text(
            clinic_manifest(
                f"site-{i}",
                subjects='["patients"]',
                extra="collection_dates_recorded = false  # the CSVs carry no collection dates",
            )
        )
    summary = run_inline(
        out,
        task="tabular-csv",
        features=3,
        classes=2,
        sites=3,
        rounds=3,
        fraction_train=1.0,
        data_dir=str(data),
        noise_multiplier=1.0,
        eval_every=1,
        eval_episodes=10,
        eval_shots=5,
    )
    assert set(summary["epsilon"]) == {"site-0", "site-1", "site-2"}
    assert not list(out.rglob("data.csv"))  # the data stayed where the sites keep it
    lines = [json.loads(x) for x in RunPaths(out).metrics.read_text().splitlines()]
    assert summary["trained"] and all(line["used"] for line in lines[1:])  # sites trained
    assert all("eval" in line for line in lines)  # held-out sites: the server evaluates
    assert summary["eval"]["adapted"] > 0.6

    res = fedmeta(
        "evaluate",
        str(out),
        "--shots",
        "5",
        "--episodes",
        "10",
        "--lr-grid",
        "0.1",
        "--out",
        str(tmp_path / "curve"),
        isolate=False,
    )
    assert res.returncode == 0, res.stderr[-1500:]
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert {p["method"] for p in curve["points"]} >= {"scratch", "meta"}  # + prototype methods

    # a new site: 10 labelled patients per class to adapt, an unlabelled CSV to predict
    write_site(tmp_path / "new-site", seed=9, n=20)
    write_site(tmp_path / "new-unlabelled", seed=9, n=40, label=False)
    res = fedmeta(
        "adapt",
        str(out),
        "--data",
        str(tmp_path / "new-site"),
        "--shots",
        "10",
        "--out",
        str(tmp_path / "adapted.pt"),
        isolate=False,
    )
    assert res.returncode == 0, res.stderr[-1500:]
    res = fedmeta(
        "predict",
        str(tmp_path / "adapted.pt"),
        "--data",
        str(tmp_path / "new-unlabelled" / "data.csv"),
        "--out",
        str(tmp_path / "pred.csv"),
        isolate=False,
    )
    assert res.returncode == 0, res.stderr[-1500:]
    rows = list(csv.DictReader((tmp_path / "pred.csv").open()))
    assert len(rows) == 40 and set(rows[0]) == {
        "record_id",
        "prediction",
        "p_benign",
        "p_malignant",
    }
    truth = ["benign", "malignant"] * 20
    assert np.mean([r["prediction"] == t for r, t in zip(rows, truth, strict=True)]) > 0.7
