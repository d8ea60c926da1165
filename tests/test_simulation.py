"""End to end: the real `fedmeta` CLI running real Flower simulations (Ray) with Opacus."""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers import fedmeta

from policies import EXAMPLE_RUN

pytestmark = pytest.mark.slow

COMMON = ["--task", "digits-fewshot", "--sites", "3", "--rounds", "3", "--seed", "5",
          "--set", "eval-every=0", "--set", "eval-episodes=5", "--set", "adapt-steps=5"]


def ray_processes() -> dict[int, str]:
    """Ray processes on this machine: pid -> command line."""
    out = subprocess.run(["pgrep", "-af", "ray::|raylet|gcs_server"], capture_output=True,
                         text=True).stdout
    return {int(pid): cmd for pid, _, cmd in (line.partition(" ") for line in out.splitlines())}


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def stable(lines):
    """Metrics without what legitimately differs: run id, timing, and audit receipts
    (hashes of log entries, which carry their time)."""
    return [{k: v for k, v in line.items() if k not in ("run", "elapsed_s", "receipts")}
            for line in lines]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    before = ray_processes()
    done = {}
    for name, strategy in (("reptile", "reptile"), ("reptile-again", "reptile"),
                           ("fedavg", "fedavg")):
        res = fedmeta("simulate", *COMMON, "--strategy", strategy, "--out", str(base / name))
        assert res.returncode == 0, res.stderr[-3000:]
        done[name] = res
    done["leftover"] = {pid: cmd for pid, cmd in ray_processes().items() if pid not in before}
    return base, done


def test_simulate_writes_a_complete_run_directory(runs):
    base, done = runs
    run = base / "reptile"
    assert {"config.json", "metrics.jsonl", "final_model.pt", "summary.json"} <= {
        p.name for p in run.iterdir()}
    lines = metrics(run)
    assert [x["round"] for x in lines] == [0, 1, 2, 3]
    assert "eval" in lines[0] and "eval" in lines[-1]
    for line in lines[1:]:
        assert len(line["sampled"]) == 2 and line["used"] == line["sampled"]
        assert all(0 < e < 10 for e in line["epsilon"].values())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["sites"] == ["site-0", "site-1", "site-2"] and summary["dp"] is True
    out = done["reptile"].stdout
    assert "epsilon spent" in out and "site-2" in out and "adapted" in out


def test_no_process_left_running(runs):
    assert runs[1]["leftover"] == {}


def test_same_seed_same_metrics(runs):
    base, _ = runs
    assert stable(metrics(base / "reptile")) == stable(metrics(base / "reptile-again"))


def test_ledger_show_json_matches_metrics(runs):
    base, _ = runs
    site_dir = base / "reptile" / "sites" / "site-1"
    res = fedmeta("ledger", "show", str(site_dir), "--json", isolate=False)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["site"] == "site-1" and doc["accountant"] == "prv" and doc["delta"] == 1e-5
    joined = [x["round"] for x in metrics(base / "reptile")[1:] if "site-1" in x["used"]]
    assert [e["round"] for e in doc["entries"]] == joined
    last = [x for x in metrics(base / "reptile") if "site-1" in x.get("epsilon", {})][-1]
    assert doc["entries"][-1]["epsilon_after"] == pytest.approx(last["epsilon"]["site-1"])
    assert set(doc["entries"][0]) == {"run", "round", "noise_multiplier", "sample_rate", "steps",
                                      "epsilon_after"}


def test_evaluate_draws_the_shots_curve(runs):
    base, _ = runs
    res = fedmeta("evaluate", str(base / "reptile"), str(base / "fedavg"), "--shots", "1,5",
                  "--episodes", "8", "--lr-grid", "0.1", "--steps", "5",
                  "--out", str(base / "curve"), isolate=False)
    assert res.returncode == 0, res.stderr
    curve = json.loads((base / "curve.json").read_text())
    assert {(p["method"], p["shots"]) for p in curve["points"]} == {
        (m, k) for m in ("scratch", "transfer", "meta") for k in (1, 5)}
    assert all(0.0 <= p["mean"] <= 1.0 for p in curve["points"])
    assert (base / "curve.png").stat().st_size > 10_000
    assert "Reptile (meta-learning)" in res.stdout


def test_budget_declines_and_is_never_reset_by_a_new_run(tmp_path):
    out = tmp_path / "tight"
    # the run declares epsilon 0.5 (policy PRIV-DP: within the sites' budget of 0.5); the
    # ledger then enforces the budget round by round: ~0.41, ~0.49, then ~0.54 > 0.5
    # (episodes train on all ~900 records of their classes: q ~ 1/90)
    declaration = tmp_path / "run.toml"
    declaration.write_text(EXAMPLE_RUN.read_text().replace("epsilon = 8.0", "epsilon = 0.5"))
    args = ["simulate", *COMMON, "--set", "fraction-train=1.0", "--set", "epsilon-max=0.5",
            "--set", f"declaration={declaration}", "--out", str(out)]
    res = fedmeta(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = metrics(out)
    assert lines[1]["used"] == ["site-0", "site-1", "site-2"]
    assert set(lines[3]["declined"]) == {"site-0", "site-1", "site-2"}
    assert all("privacy budget" in r for r in lines[3]["declined"].values())
    assert lines[3]["model_sha256"] == lines[2]["model_sha256"]  # nothing to aggregate
    summary = json.loads((out / "summary.json").read_text())
    assert summary["declined_rounds"] == {"site-0": 1, "site-1": 1, "site-2": 1}
    # the same run directory again: refused without --overwrite, one line, exit 2
    again = fedmeta(*args, isolate=False)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    # with --overwrite the ledgers are kept: every site declines from round 1
    res = fedmeta(*args, "--overwrite")
    assert res.returncode == 0, res.stderr[-3000:]
    assert all(set(x["declined"]) == {"site-0", "site-1", "site-2"} for x in metrics(out)[1:])


def test_sine_without_dp_is_explicit_and_reported(tmp_path):
    out = tmp_path / "sine"
    res = fedmeta("simulate", "--task", "sine", "--sites", "2", "--rounds", "2", "--no-dp",
                  "--set", "eval-episodes=5", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "differential privacy is OFF" in res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dp"] is False and summary["eval"]["metric"] == "mse"
    assert not (out / "sites" / "site-0" / "privacy-ledger.jsonl").exists()
    assert "DP off" in res.stdout


@pytest.mark.parametrize("args, needle", [
    (["--rounds", "0"], "rounds"),
    (["--task", "mnist"], "unknown task"),
    (["--set", "inner-steps=abc"], "inner-steps"),
    (["--set", "nonsense"], "KEY=VALUE"),
    (["--strategy", "fedprox"], "strategy"),
    (["--set", "target-epsilon=50"], "declared epsilon"),
    (["--set", "declaration=/no/such/run.toml"], "run.toml"),
])
def test_bad_options_are_one_line_errors(tmp_path, args, needle):
    res = fedmeta("simulate", "--out", str(tmp_path / "x"), *args, isolate=False)
    assert res.returncode == 2
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
