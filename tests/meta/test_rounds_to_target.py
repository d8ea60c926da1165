"""Rounds to reach FedAvg-transfer's final accuracy: the rule, on the kept curves and on
curves built to break it (a single noisy evaluation must not decide)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
CURVES = ROOT / "benchmarks" / "results" / "fewshot" / "curves"


def load_bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(
            "fewshot_accuracy_rounds", ROOT / "benchmarks" / "fewshot_accuracy.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


BENCH = load_bench()


def level(curve: list, r: int, window: int = 10) -> float:
    w = [a for rr, a, _ in curve if r - window < rr <= r]
    return sum(w) / len(w)


def kept(seed: int) -> dict[str, list]:
    out = {}
    for strat in ("reptile", "fedavg", "fomaml"):
        path = CURVES / f"np-{strat}-s{seed}.json"
        if path.exists():
            out[strat] = json.loads(path.read_text())["curve"]
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kept_curves_obey_the_rule(seed):
    """On the benchmark's own curves: the target is FedAvg's mean over its last 10 rounds,
    each strategy's round is the first whose 10-round level reaches it, none earlier."""
    curves = kept(seed)
    if "fedavg" not in curves:
        pytest.skip(f"no kept FedAvg curve for seed {seed}")
    res = BENCH.ratio_line(curves)
    fedavg = curves["fedavg"]
    final = fedavg[-1][0]
    assert res["final_round"] == final
    last = [t for t in fedavg if t[0] > final - 10]
    assert res["target"] == pytest.approx(sum(t[1] for t in last) / len(last))
    assert res["ci95"] == pytest.approx(sum(t[2] for t in last) / len(last))
    # FedAvg reaches its own final level, at the latest at its final round
    assert res["reach"]["fedavg"]["at"] is not None
    for strat, curve in curves.items():
        got = res["reach"][strat]
        eligible = [r for r, _, _ in curve if r >= 10]
        if got["at"] is None:
            assert all(level(curve, r) < res["target"] for r in eligible)
        else:
            assert level(curve, got["at"]) >= res["target"]
            assert all(level(curve, r) < res["target"] for r in eligible if r < got["at"])
        # a lower target is reached no later, a higher one no earlier
        order = [got["at_minus_ci"], got["at"], got["at_plus_ci"]]
        reached = [r for r in order if r is not None]
        assert reached == sorted(reached)
        assert all(b is None for a, b in zip(order, order[1:], strict=False) if a is None)


def test_one_noisy_evaluation_does_not_reach_the_target():
    """A single evaluation above the target inside a window whose mean is below it does
    not count; the first window whose mean is at or above it does."""
    fedavg = [[r, 0.90 if r >= 50 else 0.80, 0.01] for r in range(0, 101, 2)]
    spike = [[r, 0.85, 0.01] for r in range(0, 101, 2)]
    spike[6] = [12, 0.95, 0.01]  # one lucky evaluation at round 12
    spike[30:] = [[r, 0.91, 0.01] for r in range(60, 101, 2)]
    res = BENCH.ratio_line({"fedavg": fedavg, "reptile": spike})
    assert res["target"] == pytest.approx(0.90)
    assert res["reach"]["fedavg"]["at"] == 58  # rounds 50-58 are all at 0.90
    assert res["reach"]["reptile"]["at"] == 68  # rounds 60-68: the first full window >= 0.90


def test_rounds_section_renders_ratio_and_band_from_curve_files(tmp_path, monkeypatch):
    monkeypatch.setattr(BENCH, "RESULTS", tmp_path)
    (tmp_path / "curves").mkdir()
    fedavg = [[r, min(0.9, 0.6 + 0.01 * r), 0.01] for r in range(0, 101, 2)]
    reptile = [[r, min(0.95, 0.6 + 0.03 * r), 0.01] for r in range(0, 101, 2)]
    for name, curve in (("np-fedavg-s1", fedavg), ("np-reptile-s1", reptile)):
        (tmp_path / "curves" / f"{name}.json").write_text(json.dumps({"curve": curve}))
    text = "\n".join(BENCH.rounds_section([1], 1))
    # FedAvg's level first reaches 0.90 when its window is rounds 32-40 (0.92..1.0 capped)
    res = BENCH.ratio_line({"fedavg": fedavg, "reptile": reptile})
    f_at, r_at = res["reach"]["fedavg"]["at"], res["reach"]["reptile"]["at"]
    assert (f_at, r_at) == (38, 16)
    assert f"round {r_at}: {f_at / r_at:.1f}x fewer" in text
    assert "| 1 | 90.0 ± 1.0% (rounds 92-100) | round 38" in text
    # the band: the same rule at the target minus its CI, FedAvg's rounds there as the base
    f_lo, r_lo = res["reach"]["fedavg"]["at_minus_ci"], res["reach"]["reptile"]["at_minus_ci"]
    assert f_lo < f_at and r_lo <= r_at
    # FedAvg (capped at 0.90) never reaches the target plus its CI: no ratio there
    assert res["reach"]["fedavg"]["at_plus_ci"] is None
    r_hi = res["reach"]["reptile"]["at_plus_ci"]
    assert f"round 38 (-CI: {f_lo}; +CI: > 100)" in text
    assert f"(-CI: {r_lo}, {f_lo / r_lo:.1f}x; +CI: {r_hi})" in text
    # 51 evaluations, every 10th round in the table
    assert "evaluated every 2 rounds, every 10th round shown" in text
    assert "| 10 | " in text and "| 12 | " not in text


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0.5, 1.0), min_size=11, max_size=11),
    st.lists(st.floats(0.5, 1.0), min_size=11, max_size=11),
)
def test_rule_invariants_on_any_curves(fed, other):
    rounds = range(0, 101, 10)
    fedavg = [[r, a, 0.01] for r, a in zip(rounds, fed, strict=True)]
    curve = [[r, a, 0.01] for r, a in zip(rounds, other, strict=True)]
    res = BENCH.ratio_line({"fedavg": fedavg, "reptile": curve})
    assert res["target"] == pytest.approx(fed[-1])  # a 10-round window holds one point here
    assert res["reach"]["fedavg"]["at"] is not None
    at = res["reach"]["reptile"]["at"]
    if at is None:
        assert max(other[1:]) < res["target"]
    else:
        assert at >= 10 and other[at // 10] >= res["target"]
        assert all(a < res["target"] for a in other[1 : at // 10])
