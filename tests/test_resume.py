"""Checkpoints and resume: a run stopped midway continues from its last signed checkpoint
with the same run id; ledgers and audit logs continue and verify, and no site is charged
twice for a round (the in-process backend with the real ServerApp and ClientApp)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import ROOT, fedmeta

import fedmeta as api
from fedmeta.audit import verify_log
from fedmeta.checkpoints import CheckpointError, checkpoint_files
from fedmeta.paths import RunPaths
from fedmeta.privacy.ledger import PrivacyLedger

SETTINGS = {
    "task": "digits-fewshot",
    "sites": 3,
    "rounds": 5,
    "fraction-train": 1.0,
    "eval-every": 0,
    "eval-episodes": 2,
    "inner-steps": 2,
    "seed": 3,
}


class Stop(Exception):
    pass


def stop_after(n: int):
    def callback(m: api.RoundMetrics) -> None:
        if m.round == n:
            raise Stop(f"stopped after round {n}")

    return callback


def server_entries(out: Path) -> list[dict]:
    log = RunPaths(out).server_log
    assert verify_log(log).ok, verify_log(log).problem
    return [json.loads(x) for x in log.read_text().splitlines()]


def charges(out: Path, site: int) -> list[tuple[str, int]]:
    ledger = PrivacyLedger.read(RunPaths(out).site(f"site-{site}").ledger)
    return [(c.run, c.round) for c in ledger.charges]


def stop_midway(out: Path, n: int, **extra) -> str:
    with pytest.raises(Stop):
        api.simulate(
            {**SETTINGS, **extra}, out_dir=str(out), backend="inline", on_round=stop_after(n)
        )
    return json.loads(RunPaths(out).metrics.read_text().splitlines()[0])["run"]


def test_a_stopped_run_resumes_with_the_same_run_id_and_no_double_charge(tmp_path):
    out = tmp_path / "run"
    run_id = stop_midway(out, 2, **{"checkpoint-every": 1})
    assert not RunPaths(out).summary.exists() and not RunPaths(out).model.exists()
    assert [c.name for c in checkpoint_files(out)] == ["round-000001.pt", "round-000002.pt"]
    before = {i: charges(out, i) for i in range(3)}
    assert all(rounds == [(run_id, 1), (run_id, 2)] for rounds in before.values())

    result = api.simulate(resume=out, backend="inline")
    assert result.ok and result.run_id == run_id and result.aggregated_rounds == 5
    assert [m.round for m in result.rounds] == [0, 1, 2, 3, 4, 5]
    assert result.rounds[3].raw["resumed"] == {
        "checkpoint_round": 2,
        "next_round": 3,
        "rolled_back": [],
    }
    for i in range(3):
        after = charges(out, i)
        assert after == [(run_id, r) for r in range(1, 6)]  # each round charged once
        assert result.epsilon[f"site-{i}"] == pytest.approx(
            PrivacyLedger.read(RunPaths(out).site(f"site-{i}").ledger).epsilon()
        )
        site_log = RunPaths(out).site(f"site-{i}").audit_log
        assert verify_log(site_log).ok
        trained = [json.loads(x) for x in site_log.read_text().splitlines()]
        assert sorted(e["round"] for e in trained if e["action"] == "round.train") == [
            1,
            2,
            3,
            4,
            5,
        ]
        assert {e["run_id"] for e in trained if e["action"] == "round.train"} == {run_id}
    entries = server_entries(out)
    acts = [(e["action"], e["round"]) for e in entries]
    assert ("run.stop", None) in acts and ("run.resume", 3) in acts
    assert [a for a, _ in acts].count("run.start") == 1
    assert [r for a, r in acts if a == "round.start"] == [1, 2, 3, 4, 5]
    assert {e["run_id"] for e in entries if e["action"] != "log.created"} == {run_id}
    # every checkpoint's hash is signed in the server's log
    signed = {
        e["details"]["file"]: e["details"]["file_sha256"]
        for e in entries
        if e["action"] == "model.checkpoint"
    }
    assert {f"checkpoints/{p.name}" for p in checkpoint_files(out)} <= set(signed)
    # the report still reads the resumed run
    res = fedmeta("report", str(out), "--format", "json", isolate=False)
    assert res.returncode == 0, res.stderr[-2000:]


def test_rounds_after_the_last_checkpoint_are_not_trained_again(tmp_path):
    out = tmp_path / "run"
    run_id = stop_midway(out, 3, **{"checkpoint-every": 2})  # checkpoint at 2, stop after 3
    result = api.simulate(resume=out, backend="inline")
    resumed = [m for m in result.rounds if "resumed" in m.raw]
    assert resumed[0].raw["resumed"] == {"checkpoint_round": 2, "next_round": 4, "rolled_back": [3]}
    for i in range(3):
        # round 3's update was lost with the stop, its epsilon stays spent: never re-run
        assert charges(out, i) == [(run_id, r) for r in range(1, 6)]
    # theta continued from the round-2 checkpoint: round 4 started from its weights
    entries = server_entries(out)
    ckpt2 = next(e for e in entries if e["action"] == "model.checkpoint" and e["round"] == 2)
    start4 = next(e for e in entries if e["action"] == "round.start" and e["round"] == 4)
    assert start4["model_out"] == ckpt2["model_out"]


def test_a_changed_checkpoint_is_refused(tmp_path):
    out = tmp_path / "run"
    stop_midway(out, 2, **{"checkpoint-every": 1})
    last = checkpoint_files(out)[-1]
    last.write_bytes(last.read_bytes() + b"tampered")
    with pytest.raises(CheckpointError, match="the checkpoint was changed"):
        api.simulate(resume=out, backend="inline")
    res = fedmeta("simulate", "--backend", "inline", "--resume", str(out), isolate=False)
    assert res.returncode == 2 and "the checkpoint was changed" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_a_finished_run_is_not_resumed_and_resume_keeps_its_config(tmp_path):
    out = tmp_path / "run"
    api.simulate({**SETTINGS, "rounds": 1}, out_dir=str(out), backend="inline")
    res = fedmeta("simulate", "--backend", "inline", "--resume", str(out), isolate=False)
    assert res.returncode == 2 and "nothing to resume" in res.stderr
    res = fedmeta("simulate", "--resume", str(out), "--rounds", "9", isolate=False)
    assert res.returncode == 2 and "drop --rounds" in res.stderr


def test_a_flwr_run_resume_key_continues_the_stopped_run(tmp_path):
    """`flwr run . --run-config 'resume="RUN_DIR"'`: the ServerApp Flower starts
    (server.app:app) continues that run with its own config. Driven here by the inline
    grid with the run config Flower builds (pyproject's table, the override fused in)."""
    import tomllib

    from clients.app import app as client_app
    from fedmeta.inline_grid import run_inline
    from server.app import app as server_app

    out = tmp_path / "run"
    run_id = stop_midway(out, 2, **{"checkpoint-every": 1})
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert table["config"]["resume"] == ""  # Flower accepts only keys of this table
    from flwr.app import Context, RecordDict

    from server.app import config_for

    plain = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(table["config"])
    )
    assert config_for(plain).rounds == table["config"]["rounds"]  # '' = a new run
    run_inline(server_app, client_app, 3, {**table["config"], "resume": str(out)})
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"] == run_id and summary["status"] == "completed"
    for i in range(3):  # its own config (3 sites, 5 rounds), not the table's; no double charge
        assert charges(out, i) == [(run_id, r) for r in range(1, 6)]
    acts = [(e["action"], e["round"]) for e in server_entries(out)]
    assert ("run.resume", 3) in acts and [a for a, _ in acts].count("run.start") == 1
    # a run directory that is not one: refused before any site is asked
    from fedmeta.simulation import RunDirError

    with pytest.raises(RunDirError, match="no config.json"):
        run_inline(
            server_app, client_app, 3, {**table["config"], "resume": str(tmp_path / "nowhere")}
        )
