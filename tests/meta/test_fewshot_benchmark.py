"""The few-shot benchmark writes its tables from the measurements it keeps (real files)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "fewshot_accuracy_under_test", ROOT / "benchmarks" / "fewshot_accuracy.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.path.remove(str(ROOT / "benchmarks"))
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(module, "WORK", tmp_path / "runs")
    return module


def point(method: str, shots: int, mean: float, lr: float | None = 0.3, val=None, episodes=400):
    return {
        "method": method,
        "shots": shots,
        "mean": mean,
        "ci95": 0.01,
        "lr": lr,
        "episodes": episodes,
        "val_mean": val,
    }


def put(bench, name: str, pts: list[dict], current: bool = True) -> None:
    """A kept slice, of the current protocol unless ``current`` is False."""
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    now = (
        {
            "lr_rule": bench.LR_RULE,
            "schedule": bench.SCHEDULE,
            "steps": 20,
            "lr_grid": list(bench.LR_GRID),
        }
        if current
        else {}
    )
    (bench.RESULTS / f"{name}.json").write_text(json.dumps({**now, "points": pts}))


def put_curve(bench, name: str, curve, epsilon=()) -> None:
    (bench.RESULTS / "curves").mkdir(parents=True, exist_ok=True)
    (bench.RESULTS / "curves" / f"{name}.json").write_text(
        json.dumps({"run": name, "curve": curve, "epsilon": list(epsilon)})
    )


def test_seed_table_means_each_strategy_over_the_seeds_it_has(bench):
    put(bench, "np-s1-k1-meta", [point("meta", 1, 0.70), point("meta+proto", 1, 0.5, None)])
    put(bench, "np-s2-k1-meta", [point("meta", 1, 0.80)])
    put(bench, "np-s1-k1-transfer", [point("transfer", 1, 0.60)])
    lines = bench.seed_table([1, 2, 3], [1, 5])
    assert "| Reptile | 3 | not run | not run |" in lines
    assert "| Reptile | mean of the seeds | 75.0 (2 seeds) | not run |" in lines
    assert "| FedAvg-transfer (fine-tuned) | mean of the seeds | 60.0 (1 seed) | not run |" in lines
    assert not any(line.startswith("| FOMAML") for line in lines)


def test_rounds_to_target_per_seed_from_the_kept_curves(bench):
    fedavg = [[0, 0.6, 0.02], [20, 0.85, 0.01], [40, 0.9, 0.01]]
    put_curve(bench, "np-fedavg-s1", fedavg)
    put_curve(bench, "np-reptile-s1", [[0, 0.6, 0.02], [20, 0.91, 0.01], [40, 0.93, 0.01]])
    put_curve(bench, "np-fomaml-s1", [[0, 0.6, 0.02], [20, 0.7, 0.01], [40, 0.88, 0.01]])
    put_curve(bench, "np-fedavg-s2", fedavg)
    put_curve(bench, "np-reptile-s2", [[0, 0.6, 0.02], [20, 0.8, 0.01], [40, 0.9, 0.01]])
    text = "\n".join(bench.rounds_section([1, 2], 1))
    assert "| 1 | 90.0 ± 1.0% (round 40) | round 40 (-CI: 40; +CI: > 40) | round 20: 2.0x" in text
    assert "| 2 | 90.0 ± 1.0% (round 40) | round 40 (-CI: 40; +CI: > 40) | round 40: 1.0x" in text
    assert "not reached in 40 rounds (best level 88.0% at round 40)" in text
    assert "| 20 | 91.0 ± 1.0 | 85.0 ± 1.0 | 70.0 ± 1.0 |" in text


def test_rounds_section_needs_fedavg(bench):
    put_curve(bench, "np-reptile-s1", [[0, 0.6, 0.02], [20, 0.91, 0.01]])
    assert bench.rounds_section([1], 1) == []


def test_levers_show_validation_beside_test_and_only_when_a_lever_ran(bench):
    put(bench, "np-s1-k1-meta", [point("meta", 1, 0.77, 0.3, val=0.83)])
    put_curve(bench, "np-reptile-s1", [[0, 0.6, 0.02], [100, 0.939, 0.01]])
    put_curve(bench, "dp-reptile-s1", [[0, 0.6, 0.02], [100, 0.80, 0.01]], (6.5, 7.8))
    assert bench.levers_section([1, 2]) == []  # no lever measured: no table
    put(bench, "lever-inner16-s1-k1-meta", [point("meta", 1, 0.78, 0.1, val=0.85)])
    put(bench, "lever-inner16-s2-k1-meta", [point("meta", 1, 0.70, 0.3, val=0.80)])
    text = "\n".join(bench.levers_section([1, 2]))
    assert (
        "| the benchmark's non-private run | 1 | none | 93.9 (round 100) | 83.0 (lr 0.3) |" in text
    )
    assert (
        "| the benchmark's DP run | 1 | epsilon 8 (spent at most 7.80) | 80.0 (round 100) "
        "| not run |"
    ) in text
    assert (
        "| 16 inner steps per site round | 1 | none | not run | 85.0 (lr 0.1) | not run "
        "| 78.0 ± 1.0 (lr 0.1) | not run |"
    ) in text
    assert "| 16 inner steps per site round | mean of 2 seeds | | | 82.5 | not run | 74.0 |" in text
    assert "non-private run | mean of" not in text  # one seed: no mean row


def test_keep_run_records_curve_and_epsilon_once(bench, tmp_path):
    run = bench.WORK / "dp-reptile-s1"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(
        json.dumps(
            {"strategy": "reptile", "rounds": 20, "dp": True, "epsilon": {"a": 7.5, "b": 6.1}}
        )
    )
    (run / "config.json").write_text(json.dumps({"seed": 1, "batch-size": 10}))
    (run / "metrics.jsonl").write_text(
        json.dumps({"round": 0, "eval": {"adapted": 0.5, "adapted_ci95": 0.1}})
        + "\n"
        + json.dumps({"round": 1, "eval": None})
        + "\n"
    )
    kept = json.loads(bench.keep_run(run).read_text())
    assert kept["epsilon"] == [6.1, 7.5]
    assert kept["curve"] == [[0, 0.5, 0.1]]
    assert kept["settings"]["batch-size"] == 10
    assert bench.dp_epsilon({"reptile": "dp-reptile-s1"}) == [
        "- reptile: epsilon spent per site 6.10 .. 7.50",
        "",
    ]


def test_dp_target_picks_the_use_with_the_best_validation_score_not_the_best_test(bench):
    put(
        bench,
        "dp-s1-k5-meta",
        [
            point("meta", 5, 0.95, 0.3, val=0.80),  # best on test, worst on validation
            point("meta+proto", 5, 0.85, None, val=0.85),
            point("meta+proto-ft", 5, 0.90, 0.03, val=0.90),
        ],
    )
    put(bench, "np-s1-k5-meta", [point("meta", 5, 0.92, 0.3, val=0.93)])
    put(bench, "dp-s2-k5-meta", [point("meta", 5, 0.80, 0.3, val=0.80)])  # no non-private
    lines = bench.dp_target_table([1, 2], [5])
    assert (
        "| 1 | Reptile + prototype-initialised fine-tuning (val 90.0): 90.0 vs 92.0 (-2.0) |"
        in lines
    )
    assert not any(line.startswith("| 2 |") for line in lines)
    assert "| mean of the seeds | 90.0 vs 92.0 (-2.0; 1 seed) |" in lines
    assert bench.dp_target_table([3], [5]) == []


def test_one_se_rule_keeps_the_smaller_rate_unless_a_larger_is_clearly_better() -> None:
    from fedmeta.meta.curve import grid_summary, one_se_choice

    # 0.3 is best by 0.5 points, less than its standard error (1 point): the smaller 0.1 is kept
    assert one_se_choice({0.03: (0.80, 0.01), 0.1: (0.915, 0.01), 0.3: (0.92, 0.01)}) == 0.1
    # 0.3 is better by 3 standard errors: it is kept
    assert one_se_choice({0.03: (0.80, 0.01), 0.1: (0.89, 0.01), 0.3: (0.92, 0.01)}) == 0.3
    # the smallest rate within reach wins even when a middle one is closer to the best
    assert one_se_choice({0.03: (0.912, 0.01), 0.1: (0.919, 0.01), 0.3: (0.92, 0.01)}) == 0.03
    # regression: lower is better, and the rule reads the same way
    assert one_se_choice({0.01: (0.26, 0.02), 0.03: (0.25, 0.02)}, higher_is_better=False) == 0.01
    assert one_se_choice({0.01: (0.40, 0.02), 0.03: (0.25, 0.02)}, higher_is_better=False) == 0.03
    with pytest.raises(ValueError, match="no learning rate"):
        one_se_choice({})
    # the standard error is the episodes' sample standard deviation over sqrt(n)
    summary = grid_summary({0.1: [0.0, 1.0, 0.0, 1.0], 0.3: [1.0, 1.0, 1.0, 1.0]})
    assert summary[0.1] == pytest.approx((0.5, (1 / 3) ** 0.5 / 2))
    assert summary[0.3] == (1.0, 0.0)
    assert one_se_choice(summary) == 0.3


def test_a_slice_of_an_earlier_protocol_is_measured_again_with_its_own_settings(bench):
    old = {
        "lr_grid": [0.03, 0.1, 0.3],
        "episodes": 400,
        "val_episodes": 100,
        "steps": 20,
        "shift": True,
        "points": [
            {**point("meta", 1, 0.7), "run_dir": "benchmarks/.runs/np-reptile-s1"},
            {**point("meta+proto", 1, 0.6, None), "run_dir": "benchmarks/.runs/np-reptile-s1"},
            {**point("meta", 5, 0.9), "run_dir": "benchmarks/.runs/np-reptile-s1"},
        ],
    }
    put(bench, "shift-s1-k1-meta", [])
    path = bench.RESULTS / "shift-s1-k1-meta.json"
    path.write_text(json.dumps(old))
    assert not bench.current(path)
    cmd = bench.rechoose_command(path)
    assert cmd[1:3] == ["benchmarks/fewshot_eval.py", "benchmarks/.runs/np-reptile-s1"]
    text = " ".join(cmd)
    assert "--shots 1,5 --methods meta,meta+proto" in text
    assert f"--lr-grid {bench.GRID} --episodes 400 --val-episodes 100 --steps 20" in text
    assert cmd[-1] == "--shift"
    # the current rule and schedule with an earlier grid: measured again with the current one
    now = {"lr_rule": bench.LR_RULE, "schedule": bench.SCHEDULE}
    path.write_text(json.dumps({**old, **now}))
    assert not bench.current(path)
    assert f"--lr-grid {bench.GRID} " in " ".join(bench.rechoose_command(path))
    assert 0.01 in bench.LR_GRID and bench.GRID.startswith("0.01,0.03,")
    path.write_text(json.dumps({**old, **now, "lr_grid": list(bench.LR_GRID)}))
    assert bench.current(path) and bench.rechoose_command(path) is None
    # the 100-step rows keep their own grid
    long = {**old, **now, "steps": 100, "lr_grid": [0.1, 0.3, 0.5]}
    path.write_text(json.dumps(long))
    assert bench.current(path)
    # a slice of scratch alone names no run: the main seed's Reptile run gives the settings
    path.write_text(json.dumps({**old, "shift": False, "points": [point("scratch", 1, 0.5)]}))
    cmd = bench.rechoose_command(path)
    assert cmd[2] == str(bench.WORK / "np-reptile-s1") and "--shift" not in cmd


def test_tables_mark_earlier_protocol_cells_and_show_the_change_and_the_evidence(bench):
    now = {
        "lr_rule": bench.LR_RULE,
        "schedule": bench.SCHEDULE,
        "steps": 20,
        "lr_grid": list(bench.LR_GRID),
    }
    grid = {"0.03": [0.30, 0.01], "0.1": [0.61, 0.015], "0.3": [0.76, 0.017], "0.5": [0.82, 0.014]}
    new = {**point("scratch", 5, 0.759, 0.5, val=0.82), "val_grid": grid}
    old = {**point("scratch", 5, 0.541, 0.3, val=0.64), "ci95": 0.018}
    bench.RESULTS.mkdir(parents=True)
    (bench.RESULTS / "scratch-20-k5.json").write_text(
        json.dumps({**now, "points": [new], "previous": {"points": [old]}})
    )
    put(bench, "scratch-20-k1", [point("scratch", 1, 0.565, 0.3)], current=False)
    pts = bench.points(sorted(bench.RESULTS.glob("scratch-20-k*.json")))
    lines = bench.table(pts, [1, 5])
    assert (
        "| scratch (20 steps, the common budget) | 56.5 ± 1.0 (lr 0.3; earlier protocol) "
        "| 75.9 ± 1.0 (lr 0.5) |"
    ) in lines
    change = bench.change_table(pts, [1, 5])
    assert "| scratch (20 steps, the common budget) | — | 54.1 → 75.9 (lr 0.3 → 0.5; +21.8) |" in (
        change
    )
    evidence = bench.grid_table(
        {("scratch-20", k): p for (_, k), p in pts.items()}, [1, 5], ("scratch-20",)
    )
    assert (
        "| scratch (20 steps, the common budget) | 5 | 30.0 ± 1.0 | 61.0 ± 1.5 | 76.0 ± 1.7 "
        "| **82.0 ± 1.4** |"
    ) in evidence
    assert not any("| 1 |" in line for line in evidence)  # the earlier cell has no grid
    assert bench.change_table(bench.points([bench.RESULTS / "scratch-20-k1.json"]), [1]) == []


def test_breast_cancer_shot_counts_the_test_hospitals_cannot_supply_say_why(bench):
    why = bench.bc_infeasible([1, 5, 10])
    assert set(why) == {10}
    assert why[10].startswith("not feasible: the test hospitals hold 1 and 6 patients")
    put(bench, "bc-s1", [point("scratch", 1, 0.6), point("scratch", 5, 0.9)])
    lines = bench.held_out_sites(1, 100, ["1", "5", "10"], run=False)
    assert any(
        "| 60.0 ± 1.0 (lr 0.3) | 90.0 ± 1.0 (lr 0.3) | not feasible: the test hospitals" in line
        for line in lines
    )


def test_rule_note_counts_the_cells_where_the_rule_kept_a_smaller_rate(bench):
    grid = {"0.1": [0.80, 0.01], "0.3": [0.805, 0.01]}  # 0.3 best by less than one SE
    put(bench, "np-s1-k1-meta", [{**point("meta", 1, 0.7, 0.1), "val_grid": grid}])
    clear = {"0.1": [0.70, 0.01], "0.3": [0.80, 0.01]}
    put(bench, "np-s1-k5-meta", [{**point("meta", 5, 0.9, 0.3), "val_grid": clear}])
    put(bench, "np-s1-k10-meta", [point("meta", 10, 0.9, 0.3)], current=False)
    (bench.RESULTS / "sine-gap.json").write_text(json.dumps({"grid": [0.01], "rows": {}}))
    note = bench.rule_note(sorted(bench.RESULTS.glob("*.json")))
    assert note[0].startswith("Over all 2 cells measured under this protocol")
    assert "smaller rate than the best validation rate in 1;" in note[0]


def test_a_cell_of_the_earlier_grid_says_so_and_keeps_its_earlier_choice(bench):
    kept = {
        "lr_rule": bench.LR_RULE,
        "schedule": bench.SCHEDULE,
        "steps": 20,
        "lr_grid": [0.03, 0.1, 0.3, 0.5],
    }
    bench.RESULTS.mkdir(parents=True)
    (bench.RESULTS / "dp-s1-k5-transfer.json").write_text(
        json.dumps({**kept, "points": [point("transfer", 5, 0.753, 0.03)]})
    )
    moved = {**point("transfer", 5, 0.852, 0.01), "val_grid": {"0.01": [0.87, 0.006]}}
    (bench.RESULTS / "dp-s2-k5-transfer.json").write_text(
        json.dumps(
            {
                **kept,
                "lr_grid": list(bench.LR_GRID),
                "points": [moved],
                "grid_previous": {"points": [point("transfer", 5, 0.753, 0.03)]},
            }
        )
    )
    old = bench.points([bench.RESULTS / "dp-s1-k5-transfer.json"])[("transfer", 5)]
    assert bench.cell(old) == "75.3 ± 1.0 (lr 0.03; earlier grid, without 0.01)"
    new = bench.points([bench.RESULTS / "dp-s2-k5-transfer.json"])[("transfer", 5)]
    assert bench.cell(new) == "85.2 ± 1.0 (lr 0.01)"
    assert new["grid_before"]["lr"] == 0.03
    moves = bench.grid_moves(sorted(bench.RESULTS.glob("*.json")))
    assert (
        "| dp-s2-k5-transfer | FedAvg-transfer (fine-tuned) | 5 | 75.3 (lr 0.03) "
        "| 85.2 ± 1.0 (lr 0.01) | +9.9 |"
    ) in moves
    assert any(line.endswith("`--rechoose` extends them): dp-s1-k5-transfer.") for line in moves)
