"""`flwr run .`: the same ServerApp/ClientApp through Flower's own CLI and local SuperLink."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, copy_project, loopback_only, processes_with_env

from fedmeta.offline import OFFLINE_ENV
from fedmeta.paths import RunPaths

pytestmark = pytest.mark.slow


def test_flwr_run_local_simulation(tmp_path):
    app = copy_project(tmp_path / "app")
    flwr_home = str(tmp_path / "flwr-home")
    env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": flwr_home,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [*loopback_only(), "flwr", "run", ".", "--stream", "--run-config",
           'rounds=2 eval-episodes=5 task="breast-cancer-sites"']
    try:
        res = subprocess.run(cmd, cwd=app, env=env, capture_output=True, text=True, timeout=400)
        deadline = time.monotonic() + 60
        runs = app / "runs" / "flwr"  # out-dir = "runs/flwr/{run}": a directory per run
        while not list(runs.glob("*/summary.json")) and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        # the local SuperLink that `flwr run` started outlives the command: stop it by PID
        for pid in processes_with_env("FLWR_HOME", flwr_home):
            os.kill(pid, signal.SIGTERM)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    (summary,) = runs.glob("*/summary.json")
    data = json.loads(summary.read_text())
    assert summary.parent.name == data["run"]
    assert data["task"] == "breast-cancer-sites" and data["rounds"] == 2
    assert data["sites"] == ["site-0", "site-1"] and data["dp"] is True
    assert set(data["epsilon"]) == {"site-0", "site-1"}
    lines = RunPaths(summary.parent).metrics.read_text().splitlines()
    assert len(lines) == 3
    assert (app / "pyproject.toml").read_bytes() == (ROOT / "pyproject.toml").read_bytes()
