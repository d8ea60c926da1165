"""`fedmeta evaluate`'s curve reaches the report's learning section and its plot."""

from __future__ import annotations

import json

from fedmeta.paths import SHOTS_CURVE
from fedmeta.report.learning import shots_curve
from fedmeta.report.model import ShotsPoint


def test_the_report_reads_the_saved_curve_and_skips_a_broken_one(tmp_path) -> None:
    assert shots_curve(tmp_path) == []
    point = {
        "method": "meta+proto",
        "label": "Reptile + prototypes",
        "shots": 1,
        "metric": "accuracy",
        "mean": 0.8,
        "ci95": 0.01,
        "lr": None,
        "episodes": 400,
        "run_dir": "x",
        "steps": 0,
        "val_mean": 0.7,
        "val_episodes": 100,
    }
    (tmp_path / SHOTS_CURVE).write_text(json.dumps({"shift": True, "points": [point]}))
    got = shots_curve(tmp_path)
    assert got == [
        ShotsPoint(
            method="meta+proto",
            label="Reptile + prototypes",
            shots=1,
            mean=0.8,
            ci95=0.01,
            lr=None,
            episodes=400,
            shift=True,
        )
    ]
    (tmp_path / SHOTS_CURVE).write_text("{not json")
    assert shots_curve(tmp_path) == []
