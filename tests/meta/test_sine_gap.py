"""The sine gap block is rendered from the kept measurements (split over several files)
and the gap script refuses a run that is not a non-private sine run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "fewshot"


def load(name: str, file: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def test_sine_block_merges_the_kept_files_in_order():
    bench = load("fewshot_accuracy_sine", "fewshot_accuracy.py")
    paths = sorted(RESULTS.glob("sine-gap*.json"))
    if len(paths) < 2:
        pytest.skip("the sine measurements are not kept")
    rows = {}
    for path in paths:
        rows.update(json.loads(path.read_text())["rows"])
    lines = bench.sine_section(paths)
    table = [line for line in lines if line.startswith("| federated") or "| centralized" in line]
    assert len(table) == len(rows)  # every row of every file, once
    names = [line.split(" | ")[0].lstrip("| ") for line in table]
    # federated first, then per task supply, each by number of steps (numerically)
    fed = [n for n in names if n.startswith("federated")]
    assert names[: len(fed)] == fed
    steps = [int(n.split(", ")[1].split()[0]) for n in fed]
    assert steps == sorted(steps)
    for name, row in rows.items():
        assert f"| {name} | {row['mse']:.3f} ± {row['ci95']:.3f} | {row['lr']:g} |" in lines
        if row.get("val_curve"):
            last = row["val_curve"][-1]
            assert any(
                line.startswith(f"Validation curve of the {row['rounds']} rounds") for line in lines
            )
            assert any(line.startswith("| MSE |") and f"{last[1]:.2f} |" in line for line in lines)


def test_sine_block_is_empty_without_measurements(tmp_path):
    bench = load("fewshot_accuracy_sine_empty", "fewshot_accuracy.py")
    assert bench.sine_section([]) == []


def test_federated_row_refuses_a_run_of_another_task(tmp_path):
    gap = load("sine_gap_under_test", "sine_gap.py")
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"task": "digits-fewshot", "dp": False}))
    with pytest.raises(SystemExit, match="not a non-private sine run"):
        gap.federated_row(run, gap.Sine(), [0.01], [], [])
    (run / "summary.json").write_text(json.dumps({"task": "sine", "dp": True}))
    with pytest.raises(SystemExit, match="not a non-private sine run"):
        gap.federated_row(run, gap.Sine(), [0.01], [], [])


def test_sine_rows_sort_by_steps_as_numbers(tmp_path):
    bench = load("fewshot_accuracy_sine_order", "fewshot_accuracy.py")
    row = {"mse": 0.5, "ci95": 0.1, "lr": 0.01}
    rows = {
        "centralized, same tasks, 1000 meta steps": row,
        "federated (sites), 1000 rounds": row,
        "centralized, same tasks, 300 meta steps": row,
        "federated (sites), 300 rounds": row,
    }
    path = tmp_path / "sine-gap.json"
    path.write_text(json.dumps({"grid": [0.01], "rows": rows}))
    names = [line.split(" | ")[0] for line in bench.sine_section([path]) if line.startswith("| ")]
    assert names[1:] == [
        "| federated (sites), 300 rounds",
        "| federated (sites), 1000 rounds",
        "| centralized, same tasks, 300 meta steps",
        "| centralized, same tasks, 1000 meta steps",
    ]


def test_sine_block_names_the_rate_rule_each_file_was_measured_with(tmp_path):
    bench = load("fewshot_accuracy_sine_rule", "fewshot_accuracy.py")
    row = {"mse": 0.5, "ci95": 0.1, "lr": 0.01}
    old, new = tmp_path / "sine-gap.json", tmp_path / "sine-gap-new.json"
    old.write_text(json.dumps({"grid": [0.01], "rows": {"federated (sites), 300 rounds": row}}))
    new.write_text(
        json.dumps({"grid": [0.01], "rule": "one-se", "rows": {"federated (sites), 9 rounds": row}})
    )
    assert "the rate of lowest validation MSE" in bench.sine_section([old])[0]
    assert "within one standard error" in bench.sine_section([new])[0]
    assert "rules differ between rows" in bench.sine_section([old, new])[0]
