"""Runs fail loudly: a run whose sites are all lost, declined or out of budget, a run with
no usable reply for several rounds, and a model no site could train all stop with a
failed status (``fedmeta simulate`` exits 1 with the reasons, one line per site), and a
run that aggregated nothing writes no model. The real ServerApp and ClientApp on the
in-process grid; one test on Flower's Ray engine (its error text is a remote traceback)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import clinic_manifest, fedmeta, run_inline
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fedmeta.audit import verify_log
from fedmeta.failures import RunWatch, failure_text, one_line_error
from fedmeta.paths import LEDGER_FILE, RunPaths, SitePaths
from policies import EXAMPLE_RUN

EXAMPLES = Path(__import__("fedmeta.data", fromlist=["x"]).__path__[0]) / "examples"
SMALL = {
    "sites": 3,
    "rounds": 6,
    "fraction-train": 1.0,
    "eval-episodes": 2,
    "eval-every": 0,
    "inner-steps": 2,
}


def lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in RunPaths(out).metrics.read_text().splitlines()]


def actions(out: Path) -> list[str]:
    log = RunPaths(out).server_log
    assert verify_log(log).ok
    return [json.loads(x)["action"] for x in log.read_text().splitlines()]


def csv_sites(out: Path, n: int = 3) -> None:
    """Sites holding the example cohort (3 feature columns), each with its manifest."""
    for i in range(n):
        site = RunPaths(out).site(f"site-{i}").root
        site.mkdir(parents=True)
        (site / "data.csv").write_text((EXAMPLES / "cohort.csv").read_text())
        (site / "schema.toml").write_text((EXAMPLES / "cohort.schema.toml").read_text())
        SitePaths(site).manifest.write_text(clinic_manifest(f"site-{i}"))


# ---- pure parts ----------------------------------------------------------------------
RAY_REASON = (
    "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor"
    '.run()\x1b[39m (pid=4242, ip=127.0.0.1, actor_id=ab12)\n  File "/x/ray_actor.py", line '
    "65, in run\n    raise ClientAppException(str(ex)) from ex\nflwr.clientapp.client_app."
    "ClientAppException: \nException ClientAppException occurred. Message: data.csv: 3 "
    "feature columns, the run expects 5'>"
)


def test_a_ray_error_reason_is_reduced_to_the_sites_own_line():
    assert one_line_error(RAY_REASON) == "data.csv: 3 feature columns, the run expects 5"
    inline = (
        "<class 'flwr.clientapp.client_app.ClientAppException'>:<'TaskError: "
        "data.csv: labels outside 0..1'>"
    )
    assert one_line_error(inline) == "TaskError: data.csv: labels outside 0..1"


@given(st.text(max_size=400))
def test_any_error_reason_becomes_one_short_line_without_colour_codes(reason):
    line = one_line_error(reason)
    assert "\n" not in line and "\x1b[" not in line and 0 < len(line) <= 240


def test_the_watch_stops_on_each_rule():
    watch = RunWatch(["a", "b"], max_failed_rounds=3)
    assert watch.observe(["a"], {"b": "policy X"}, {}, {}, aggregated=True) is None
    assert watch.observe([], {}, {"a": "norm"}, {}, aggregated=False) is None
    assert watch.observe([], {}, {"a": "norm"}, {}, aggregated=False) is None
    assert "3 consecutive" in watch.observe([], {}, {"a": "norm"}, {}, aggregated=False)
    lost = RunWatch(["a", "b"])
    assert (
        lost.observe([], {"a": "policy"}, {}, {"b": "error 2: bad"}, False)
        == "every site is lost or declined"
    )
    spent = RunWatch(["a", "b"])
    budget = "privacy budget: this round would bring epsilon to 0.6 > epsilon_max 0.5"
    assert (
        spent.observe([], {"a": budget, "b": budget}, {}, {}, False)
        == "every site's privacy budget is spent"
    )
    partly = RunWatch(["a", "b", "c"])  # site c not heard from yet: no verdict on "every"
    assert partly.observe([], {"a": budget, "b": budget}, {}, {}, False) is None


def test_summaries_never_crash_on_nan():
    from fedmeta.cli import _print_summary
    from fedmeta.rounds import RoundMetrics

    summary = {
        "run": "r",
        "strategy": "reptile",
        "task": "sine",
        "sites": ["site-0"],
        "epsilon": {"site-0": math.nan},
        "declined_rounds": {},
        "dp": True,
        "eval": {
            "metric": "mse",
            "adapted": math.nan,
            "adapted_ci95": None,
            "unadapted": math.inf,
            "episodes": 2,
            "shots": 5,
            "n_way": 1,
        },
        "wall_s": math.nan,
        "status": "failed",
        "failure": {"reason": "x", "sites": {"site-0": "lost: y"}},
    }
    _print_summary(summary, "runs/x")
    assert "site-0: lost: y" in failure_text(summary)
    m = RoundMetrics.from_line(
        {
            "round": 1,
            "run": "r",
            "eval": {"metric": "mse", "adapted": math.nan},
            "epsilon": {"site-0": math.nan, "site-1": 0.5},
        }
    )
    assert m.eval.adapted is None and m.epsilon == {"site-1": 0.5}
    assert all(math.isfinite(v) for v in m.scalars().values())


# ---- whole runs ------------------------------------------------------------------------
def test_every_site_lost_on_bad_data_fails_with_each_sites_line(tmp_path):
    out = tmp_path / "run"
    csv_sites(out)
    # the sites' CSV has 3 feature columns; the federation asks for 5
    res = fedmeta(
        "simulate",
        "--backend",
        "inline",
        "--task",
        "tabular-csv",
        "--sites",
        "3",
        "--rounds",
        "20",
        "--set",
        "features=5",
        "--set",
        "fraction-train=1.0",
        "--out",
        str(out),
        isolate=False,
    )
    assert res.returncode == 1, res.stderr[-2000:]
    summary = json.loads(RunPaths(out).summary.read_text())
    assert summary["status"] == "failed" and not summary["trained"]
    assert summary["failure"]["reason"] == "every site is lost or declined"
    assert summary["last_round"] == 1  # stopped at once, not after 20 rounds
    for i in range(3):
        problem = summary["failure"]["sites"][f"site-{i}"]
        assert "3 feature columns, the run expects 5" in problem
        assert "Traceback" not in problem and "\x1b" not in problem
        assert f"site-{i}: lost: error 2: TaskError: data.csv: 3 feature columns" in res.stderr
    assert "FAILED: every site is lost or declined" in res.stderr
    assert "Traceback" not in res.stderr
    assert not RunPaths(out).model.exists()  # nothing trained: no model
    assert "run.end" in actions(out)
    # the failed run is still evidence: its report verifies and is written
    rep = fedmeta("report", str(out), "--format", "json", isolate=False)
    assert rep.returncode == 0, rep.stderr[-2000:]


def test_a_run_whose_sites_all_decline_fails_without_a_model(tmp_path):
    out = tmp_path / "run"
    csv_sites(out)
    for i in range(3):  # a manifest without feature_columns: policy GDPR-5-1-c declines
        path = RunPaths(out).site(f"site-{i}").manifest
        path.write_text(path.read_text().replace("feature_columns", "# feature_columns"))
    summary = run_inline(out, task="tabular-csv", features=3, **SMALL)
    assert summary["status"] == "failed" and summary["aggregated_rounds"] == 0
    assert summary["failure"]["reason"] == "every site is lost or declined"
    assert all("declined" in p for p in summary["failure"]["sites"].values())
    assert not RunPaths(out).model.exists() and not summary["trained"]
    # theta's digest is the initial one: nothing changed it
    assert summary["model_sha256"] == lines(out)[0]["model_sha256"]


def test_the_run_stops_when_every_sites_budget_is_spent(tmp_path):
    out = tmp_path / "tight"
    declaration = tmp_path / "run.toml"
    declaration.write_text(EXAMPLE_RUN.read_text().replace("epsilon = 8.0", "epsilon = 0.5"))
    (tmp_path / "dpia.toml").write_text(EXAMPLE_RUN.with_name("dpia.toml").read_text())
    summary = run_inline(
        out,
        task="digits-fewshot",
        **{
            **SMALL,
            "inner-steps": 8,
            "rounds": 30,
            "epsilon-max": 0.5,
            "declaration": str(declaration),
        },
    )
    assert summary["failure"]["reason"] == "every site's privacy budget is spent"
    got = lines(out)
    assert len(got) < 10 and got[-1]["stopped"] == "every site's privacy budget is spent"
    assert summary["trained"] and summary["aggregated_rounds"] == len(got) - 2
    assert RunPaths(out).model.exists()  # the rounds that trained are kept


def test_no_usable_reply_for_max_failed_rounds_stops_the_run(tmp_path):
    out = tmp_path / "run"
    # every update exceeds the server's norm bound: dropped, neither lost nor declined
    summary = run_inline(
        out,
        task="digits-fewshot",
        **{**SMALL, "rounds": 20, "max-update-norm": 1e-9, "max-failed-rounds": 2},
    )
    assert summary["failure"]["reason"].startswith("no usable reply for 2 consecutive")
    assert [x["round"] for x in lines(out)] == [0, 1, 2]
    assert not RunPaths(out).model.exists()
    assert "dropped" in summary["failure"]["sites"]["site-0"]


class BatchNormNet(nn.Module):
    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU()
        )
        self.head = nn.Linear(16, out_dim)

    def forward(self, x):
        return self.head(self.features(x))


def test_a_model_no_site_could_train_is_refused_before_any_charge(tmp_path, monkeypatch):
    from fedmeta.data.tasks.digits import DigitsFewShot

    monkeypatch.setattr(DigitsFewShot, "build_model", lambda self, out_dim: BatchNormNet(out_dim))
    out = tmp_path / "run"
    summary = run_inline(out, task="digits-fewshot", **SMALL)
    assert summary["status"] == "failed" and summary["last_round"] == 0
    assert "BatchNorm" in summary["failure"]["reason"]
    assert "not started" in summary["failure"]["reason"]
    acts = actions(out)
    assert "model.check" in acts and "round.start" not in acts
    # no site was even asked: no ledger, no site audit log
    assert not list(out.glob(f"sites/*/{LEDGER_FILE}"))
    assert not RunPaths(out).model.exists()


def test_the_bundled_models_pass_the_set_up_check():
    from fedmeta.config import RunConfig, build_task
    from server.run import model_problem

    for task in ("digits-fewshot", "sine", "breast-cancer-sites"):
        cfg = RunConfig(task=task, sites=3)
        t = build_task(cfg)
        problem, mode = model_problem(t, cfg, t.build_model(t.out_dim(cfg.strategy)))
        assert problem is None, (task, problem)
        assert mode in ("bk", "hooks", "ew")


@pytest.mark.slow
def test_on_flowers_ray_engine_the_site_error_is_one_line(tmp_path):
    out = tmp_path / "run"
    csv_sites(out, 2)
    res = fedmeta(
        "simulate",
        "--task",
        "tabular-csv",
        "--sites",
        "2",
        "--rounds",
        "5",
        "--set",
        "features=5",
        "--set",
        "fraction-train=1.0",
        "--set",
        "node-wait-s=30",
        "--out",
        str(out),
    )
    assert res.returncode == 1, res.stderr[-3000:]
    summary = json.loads(RunPaths(out).summary.read_text())
    for i in range(2):
        problem = summary["failure"]["sites"][f"site-{i}"]
        assert problem.endswith("data.csv: 3 feature columns, the run expects 5"), problem
        assert "\x1b" not in problem and "ray::" not in problem
