"""End to end: whole federations with the real ServerApp, ClientApp and Opacus.

The round logic runs on the in-process grid (``backend="inline"``, no Ray); the
suite's real Ray simulation through the CLI (``ray_run``, tests/conftest.py) checks
the run directory, the console output, that no process outlives the run, that it
listens on loopback only, and that both backends give the same metrics for the same
seed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    RAY_RUN_SETTINGS,
    RayRun,
    adopting_orphans,
    cli_args,
    fedmeta,
    own_processes,
    run_inline,
    shadows_in,
)
from netcheck import NETWORK_MARK, root_only
from typer.testing import CliRunner

from fedmeta.cli import app
from fedmeta.paths import RUN_CONFIG_ENV, TRANSPORT_ENV, RunPaths
from policies import EXAMPLE_RUN

COMMON = RAY_RUN_SETTINGS  # the inline runs below repeat the suite's Ray run


def metrics(run_dir):
    return [json.loads(x) for x in RunPaths(run_dir).metrics.read_text().splitlines()]


def stable(lines):
    """Metrics without what legitimately differs: run id, timing, and audit receipts
    (hashes of log entries, which carry their time)."""
    return [
        {k: v for k, v in line.items() if k not in ("run", "elapsed_s", "receipts")}
        for line in lines
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Inline runs that tests only read."""
    base = tmp_path_factory.mktemp("runs")
    for name, strategy in (
        ("reptile", "reptile"),
        ("reptile-again", "reptile"),
        ("fedavg", "fedavg"),
    ):
        run_inline(base / name, strategy=strategy, **COMMON)
    return base


@pytest.mark.slow
def test_ray_simulation_writes_a_complete_run_directory(ray_run):
    """The suite's Ray run (tests/conftest.py)."""
    run, res = ray_run.out, ray_run.res
    assert {"config.json", "metrics.jsonl", "final_model.pt", "summary.json"} <= {
        p.name for p in run.iterdir()
    }
    lines = metrics(run)
    assert [x["round"] for x in lines] == [0, 1, 2, 3]
    assert "eval" in lines[0] and "eval" in lines[-1]
    for line in lines[1:]:
        assert len(line["sampled"]) == 2 and line["used"] == line["sampled"]
        assert all(0 < e < 10 for e in line["epsilon"].values())
    summary = json.loads(RunPaths(run).summary.read_text())
    assert summary["sites"] == ["site-0", "site-1", "site-2"] and summary["dp"] is True
    assert "epsilon spent" in res.stdout and "site-2" in res.stdout and "adapted" in res.stdout
    # quiet on Ray too: nothing of Flower's or Ray's on the console (see test_logging.py)
    err = " ".join(res.stderr.split())  # only fedmeta's note that simulated noise is seeded
    assert re.sub(r"note: DP noise is seeded .*? use their own CSPRNG", "", err).strip() == "", (
        res.stderr[-2000:]
    )
    assert "INFO" not in res.stdout
    server = [json.loads(x) for x in RunPaths(run).server_log.read_text().splitlines()]
    start = next(e for e in server if e["action"] == "run.start")
    assert start["details"]["transport"] == "simulation"


@pytest.mark.slow
def test_no_process_of_the_run_is_left_running(ray_run):
    assert ray_run.leftover == {}


@pytest.mark.slow
def test_ray_workers_from_such_a_directory(ray_run: RayRun):
    """Ray workers import fedmeta's packages, not a user's ``server.py``, ``clients/``,
    ``policies/`` in the directory the run started from (test_working_directory.py)."""
    assert shadows_in(ray_run.cwd)  # the suite's Ray run started there
    assert ray_run.res.returncode == 0, ray_run.res.stdout[-1500:] + ray_run.res.stderr[-1500:]
    summary = json.loads((ray_run.out / "summary.json").read_text())
    assert set(summary["epsilon"]) == {f"site-{i}" for i in range(RAY_RUN_SETTINGS["sites"])}


@root_only
@pytest.mark.slow
def test_the_ray_run_listens_on_loopback_only(ray_run: RayRun):
    """As root the Ray run gets a network namespace of its own (README: what a simulation
    exposes), although it started in one that looks like a networked machine; without
    CAP_SYS_ADMIN: the plug-in's Ray run in test_plugins.py."""
    assert ray_run.res.returncode == 0, ray_run.res.stderr[-3000:]
    names = " ".join(ray_run.seen)
    assert "gcs_server" in names and "raylet" in names, f"the check saw no Ray: {ray_run.seen}"
    assert not ray_run.exposed, f"listening on a non-loopback address: {sorted(ray_run.exposed)}"
    # and confined: a Ray component binding 0.0.0.0 would be reachable on loopback only
    assert not [x for x in ray_run.seen if x.endswith(NETWORK_MARK)], sorted(ray_run.seen)
    assert "open in this machine's network" not in ray_run.res.stderr
    assert ray_run.userns == {os.readlink("/proc/self/ns/user")}, ray_run.userns


@pytest.mark.skipif(sys.platform != "linux", reason="child subreapers are Linux-only")
def test_the_leftover_check_sees_a_process_orphaned_by_a_finished_command():
    with adopting_orphans():
        before = own_processes()
        # the command starts a background sleep and exits at once, orphaning it
        subprocess.run(["sh", "-c", "sleep 30 >/dev/null 2>&1 &"], check=True)
        # the forked child may not have exec'd ``sleep`` yet: wait until it has (or 10 s)
        deadline = time.monotonic() + 10
        while True:
            left = {pid: cmd for pid, cmd in own_processes().items() if pid not in before}
            if time.monotonic() > deadline or all(c.startswith("sleep") for c in left.values()):
                break
            time.sleep(0.05)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)  # it is this process's child now
    assert [cmd for cmd in left.values()] == ["sleep 30"]


@pytest.mark.slow
def test_ray_and_inline_backends_give_the_same_metrics(ray_run, runs):
    ray_lines, inline_lines = stable(metrics(ray_run.out)), stable(metrics(runs / "reptile"))
    assert len(ray_lines) == 4 and all(x["used"] for x in ray_lines[1:])
    # epsilons to 1e-9 relative: the PRV accountant reuses its work within a process, so
    # the last bits depend on which rounds that process computed before (Ray actors vs one
    # process); everything else, model digests included, is exact
    for ray_line, inline_line in zip(ray_lines, inline_lines, strict=True):
        for key in ("epsilon", "epsilon_round"):  # absent from round 0
            ray_eps, inline_eps = ray_line.pop(key, None), inline_line.pop(key, None)
            assert (ray_eps is None and inline_eps is None) or ray_eps == pytest.approx(
                inline_eps, rel=1e-9
            )
    assert ray_lines == inline_lines


def test_same_seed_same_metrics(runs):
    assert stable(metrics(runs / "reptile")) == stable(metrics(runs / "reptile-again"))
    models = {
        name: [x["model_sha256"] for x in metrics(runs / name)] for name in ("reptile", "fedavg")
    }
    assert not set(models["reptile"][1:]) & set(models["fedavg"][1:])


def test_inline_run_is_recorded_as_a_simulation(runs):
    server = [
        json.loads(x)
        for x in (runs / "reptile" / "audit" / "server-audit-log.jsonl").read_text().splitlines()
    ]
    start = next(e for e in server if e["action"] == "run.start")
    assert start["details"]["transport"] == "simulation"
    assert start["details"]["serverapp_tls"] is None
    assert TRANSPORT_ENV not in os.environ and RUN_CONFIG_ENV not in os.environ


def test_ledger_show_json_matches_metrics(runs):
    site_dir = runs / "reptile" / "sites" / "site-1"
    res = fedmeta("ledger", "show", str(site_dir), "--json", isolate=False)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["site"] == "site-1" and doc["accountant"] == "prv" and doc["delta"] == 1e-5
    joined = [x["round"] for x in metrics(runs / "reptile")[1:] if "site-1" in x["used"]]
    assert joined and [e["round"] for e in doc["entries"]] == joined
    last = [x for x in metrics(runs / "reptile") if "site-1" in x.get("epsilon", {})][-1]
    assert doc["entries"][-1]["epsilon_after"] == pytest.approx(last["epsilon"]["site-1"])
    assert set(doc["entries"][0]) == {
        "run",
        "round",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "epsilon_after",
    }


def test_evaluate_draws_the_shots_curve_and_reptile_beats_chance_and_scratch(
    runs, tmp_path_factory
):
    # a trained Reptile initialisation (12 rounds, every site, no DP) against the
    # 3-round FedAvg run; all evaluation episodes are seeded, so the numbers are fixed
    trained = tmp_path_factory.mktemp("trained") / "reptile"
    run_inline(
        trained,
        **{**COMMON, "rounds": 12, "fraction-train": 1.0, "dp": False, "strategy": "reptile"},
    )
    base = runs.parent
    res = fedmeta(
        "evaluate",
        str(trained),
        str(runs / "fedavg"),
        "--shots",
        "1,5",
        "--episodes",
        "30",
        "--lr-grid",
        "0.1",
        "--steps",
        "5",
        "--out",
        str(base / "curve"),
        isolate=False,
    )
    assert res.returncode == 0, res.stderr
    curve = json.loads((base / "curve.json").read_text())
    points = {(p["method"], p["shots"]): p for p in curve["points"]}
    assert {(m, k) for m in ("scratch", "transfer", "meta") for k in (1, 5)} <= set(points)
    assert all(0.0 <= p["mean"] <= 1.0 for p in curve["points"])
    chance = 1 / curve["n_way"]
    for k in (1, 5):
        meta, scratch = points[("meta", k)], points[("scratch", k)]
        assert meta["mean"] - meta["ci95"] > chance, meta
        assert meta["mean"] - meta["ci95"] > scratch["mean"] + scratch["ci95"], (meta, scratch)
    assert (base / "curve.png").stat().st_size > 10_000
    assert "Reptile (meta-learning)" in res.stdout


def test_budget_declines_and_is_never_reset_by_a_new_run(tmp_path):
    out = tmp_path / "tight"
    # the run declares epsilon 0.55 (policy PRIV-DP: within the sites' budget of 0.55); the
    # ledger then enforces the budget round by round. Per image (4 rotations = one unit) a
    # round costs ~0.51 first, ~0.56-0.61 after two: every site trains once, then declines,
    # and the run stops because every site's budget is spent
    declaration = tmp_path / "run.toml"
    declaration.write_text(EXAMPLE_RUN.read_text().replace("epsilon = 8.0", "epsilon = 0.55"))
    (tmp_path / "dpia.toml").write_text(EXAMPLE_RUN.with_name("dpia.toml").read_text())
    settings = {
        **COMMON,
        "fraction-train": 1.0,
        "epsilon-max": 0.55,
        "declaration": str(declaration),
    }
    summary = run_inline(out, **settings)
    lines = metrics(out)
    assert lines[1]["used"] == ["site-0", "site-1", "site-2"]
    assert all(0.5 < e <= 0.55 for e in lines[1]["epsilon"].values())
    assert set(lines[2]["declined"]) == {"site-0", "site-1", "site-2"}
    # the site's run cap (the declared 0.55) or its ledger's epsilon_max (0.55) stops it
    assert all("privacy budget" in r or "run's epsilon" in r for r in lines[2]["declined"].values())
    assert lines[2]["model_sha256"] == lines[1]["model_sha256"]  # nothing to aggregate
    assert summary["declined_rounds"] == {"site-0": 1, "site-1": 1, "site-2": 1}
    assert summary["failure"]["reason"] == "every site's privacy budget is spent"
    assert len(lines) == 3  # stopped after round 2, not run on to round 3
    # the same run directory again: refused without --overwrite, one line, exit 2
    again = fedmeta("simulate", *cli_args(settings), "--out", str(out), isolate=False)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    # with --overwrite the ledgers are kept: every site declines from round 1
    run_inline(out, overwrite=True, **settings)
    assert all(set(x["declined"]) == {"site-0", "site-1", "site-2"} for x in metrics(out)[1:])


def test_sine_without_dp_is_explicit_and_reported(tmp_path):
    out = tmp_path / "sine"
    res = fedmeta(
        "simulate",
        "--backend",
        "inline",
        "--task",
        "sine",
        "--sites",
        "2",
        "--rounds",
        "2",
        "--no-dp",
        "--set",
        "eval-episodes=5",
        "--out",
        str(out),
        isolate=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "differential privacy is OFF" in res.stderr
    summary = json.loads(RunPaths(out).summary.read_text())
    assert summary["dp"] is False and summary["eval"]["metric"] == "mse"
    assert not RunPaths(out).site("site-0").ledger.exists()
    assert "DP off" in res.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--rounds", "0"], "rounds"),
        (["--task", "mnist"], "unknown task"),
        (["--set", "inner-steps=abc"], "inner-steps"),
        (["--set", "nonsense"], "KEY=VALUE"),
        (["--strategy", "fedprox"], "strategy"),
        (["--set", "target-epsilon=50"], "declared epsilon"),
        (["--set", "declaration=/no/such/run.toml"], "run.toml"),
        (["--backend", "threads"], "--backend"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, args, needle):
    # in-process through typer's runner; the subprocess path is the budget test's refusal
    res = CliRunner().invoke(app, ["simulate", "--out", str(tmp_path / "x"), *args])
    assert res.exit_code == 2, res.output
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_unknown_backend_is_refused_by_the_api(tmp_path):
    from fedmeta.config import RunConfig
    from fedmeta.simulation import simulate

    with pytest.raises(ValueError, match="backend"):
        simulate(RunConfig(out_dir=str(tmp_path / "x")), backend="threads")
    assert not Path(tmp_path / "x").exists()
