"""The documented Python API: ``fedmeta.simulate`` with ``on_round``, typed results,
``RunFailed``, ``evaluate``, the example script, and the TensorBoard / MLflow trackers fed
by the same round callback (in-process backend)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT

import fedmeta
from fedmeta.paths import RunPaths

SETTINGS = {
    "task": "sine",
    "sites": 3,
    "rounds": 3,
    "fraction-train": 1.0,
    "eval-every": 1,
    "eval-episodes": 3,
    "inner-steps": 2,
}


def test_public_names_are_exported():
    for name in fedmeta.__all__:
        assert getattr(fedmeta, name) is not None
    assert fedmeta.simulate.__doc__ and "on_round" in fedmeta.simulate.__doc__
    with pytest.raises(AttributeError):
        fedmeta.no_such_name  # noqa: B018


def test_simulate_returns_typed_results_and_calls_on_round(tmp_path):
    seen: list[fedmeta.RoundMetrics] = []
    result = fedmeta.simulate(
        SETTINGS, out_dir=str(tmp_path / "run"), backend="inline", on_round=seen.append
    )
    assert isinstance(result, fedmeta.RunResult) and result.ok and result.trained
    assert [m.round for m in seen] == [0, 1, 2, 3] == [m.round for m in result.rounds]
    assert seen[1].used == ["site-0", "site-1", "site-2"] and seen[1].aggregated
    assert isinstance(seen[-1].eval, fedmeta.EvalMetrics) and seen[-1].eval.metric == "mse"
    assert set(result.epsilon) == {"site-0", "site-1", "site-2"}
    assert all(e > 0 for e in result.epsilon.values())
    assert result.epsilon == seen[-1].epsilon
    saved = torch.load(RunPaths(result.run_dir).model, weights_only=True)["state_dict"]
    assert all(torch.equal(result.final_model[k], v) for k, v in saved.items())
    assert result.model_sha256 == seen[-1].model_sha256
    ev = fedmeta.evaluate(result.run_dir, episodes=3)
    assert ev.metric == "mse" and ev.adapted is not None and ev.episodes == 3


def test_a_failed_run_raises_run_failed_with_the_result(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(fedmeta.RunFailed) as info:
        # every update is dropped by the server's norm bound: nothing is ever aggregated
        fedmeta.simulate(
            SETTINGS,
            out_dir=str(out),
            backend="inline",
            **{"max-update-norm": 1e-9, "max-failed-rounds": 1},
        )
    result = info.value.result
    assert not result.ok and not result.trained and result.final_model is None
    assert result.failure.reason.startswith("no usable reply for 1 consecutive")
    assert "FAILED" in str(info.value)
    again = fedmeta.simulate(
        SETTINGS,
        out_dir=str(out),
        backend="inline",
        overwrite=True,
        check=False,
        **{"max-update-norm": 1e-9, "max-failed-rounds": 1},
    )
    assert again.status == "failed"


def test_bad_config_is_a_one_line_config_error(tmp_path):
    with pytest.raises(fedmeta.ConfigError, match="option 'rounds'"):
        fedmeta.simulate(SETTINGS, out_dir=str(tmp_path), rounds=0, backend="inline")


@pytest.mark.slow
def test_the_example_script_runs(tmp_path):
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "api_example.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "round 0:" in out and ": completed, 4 rounds aggregated" in out
    assert "stopped: stopped by the example after round 2" in out
    assert "rounds [0, 1, 2, 3, 4]" in out  # the resumed run, same run id
    assert "as expected, " in out and "report: " in out
    assert json.loads((tmp_path / "run" / "report.json").read_text())


def test_tensorboard_gets_each_rounds_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = fedmeta.TensorBoardTracker(tmp_path / "tb")
    fedmeta.simulate(SETTINGS, out_dir=str(tmp_path / "run"), backend="inline", on_round=tb)
    tb.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"sites/used", "eval/mse_adapted", "epsilon/site-0"} <= set(tags)
    assert [e.step for e in acc.Scalars("sites/used")] == [0, 1, 2, 3]
    assert [e.value for e in acc.Scalars("sites/used")] == [0.0, 3.0, 3.0, 3.0]


@pytest.mark.slow  # MLflow's SQLite store migrates its schema first (~30 s)
def test_mlflow_gets_each_rounds_scalars(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = fedmeta.MLflowTracker(tracking_uri=uri, experiment="fedmeta-test")
    result = fedmeta.simulate(
        SETTINGS, out_dir=str(tmp_path / "run"), backend="inline", on_round=tracker
    )
    tracker.close()
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("fedmeta-test").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["fedmeta.run"] == result.run_id
    history = client.get_metric_history(runs[0].info.run_id, "sites.used")
    assert [(m.step, m.value) for m in history] == [(0, 0.0), (1, 3.0), (2, 3.0), (3, 3.0)]


def test_the_cli_feeds_the_trackers(tmp_path):
    pytest.importorskip("tensorboard")
    from helpers import fedmeta as cli

    res = cli(
        "simulate",
        "--backend",
        "inline",
        "--task",
        "sine",
        "--sites",
        "2",
        "--rounds",
        "2",
        "--set",
        "eval-episodes=2",
        "--out",
        str(tmp_path / "run"),
        "--tensorboard",
        str(tmp_path / "tb"),
        isolate=False,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_a_missing_tracker_package_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'fedmeta\[mlflow\]'"):
        fedmeta.MLflowTracker()


def test_docs_name_every_public_name():
    text = (ROOT / "docs" / "api.md").read_text()
    for name in fedmeta.__all__:
        assert name in text, name
    assert Path(ROOT / "examples" / "api_example.py").is_file()
