"""`flwr run .`: the same ServerApp/ClientApp through Flower's own CLI and local SuperLink;
while it runs, none of its processes (the local SuperLink, Flower's flwr-simulation
process, Ray's services and workers) listens where another machine could reach it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, copy_project, processes_with_env
from netcheck import ADDRESSED, CAN_ADDRESS, exposed_listeners

from fedmeta.offline import OFFLINE_ENV
from fedmeta.paths import RunPaths

pytestmark = pytest.mark.slow


def test_flwr_run_local_simulation(tmp_path):
    app = copy_project(tmp_path / "app")
    flwr_home = str(tmp_path / "flwr-home")
    env = {
        **os.environ,
        **OFFLINE_ENV,
        "FLWR_HOME": flwr_home,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    # as root: in a namespace of the test's own that looks like a networked machine
    cmd = [
        *(ADDRESSED if CAN_ADDRESS else []),
        "flwr",
        "run",
        ".",
        "--stream",
        "--run-config",
        'rounds=2 eval-episodes=5 task="breast-cancer-sites"',
    ]
    exposed: set[str] = set()
    seen: set[str] = set()

    def look(pid: int) -> None:
        found, listening = exposed_listeners([pid, *processes_with_env("FLWR_HOME", flwr_home)])
        exposed.update(found)
        seen.update(listening)

    runs = app / "runs" / "flwr"  # out-dir = "runs/flwr/{run}": a directory per run
    proc: subprocess.Popen[str] | None = None
    try:
        with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
            proc = subprocess.Popen(cmd, cwd=app, env=env, stdout=out, stderr=err, text=True)
            deadline = time.monotonic() + 400
            while proc.poll() is None and time.monotonic() < deadline:
                look(proc.pid)
                time.sleep(0.5)
            returncode = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        deadline = time.monotonic() + 60
        while not list(runs.glob("*/summary.json")) and time.monotonic() < deadline:
            look(proc.pid)
            time.sleep(0.5)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        # the local SuperLink that `flwr run` started outlives the command: stop it by PID
        for pid in processes_with_env("FLWR_HOME", flwr_home):
            os.kill(pid, signal.SIGTERM)
    res = subprocess.CompletedProcess(
        cmd, returncode, (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    )
    print("listening:", *sorted(seen), sep="\n  ")
    names = " ".join(seen)
    assert "flower-superlin" in names and "gcs_server" in names and "raylet" in names, (
        f"the check did not see the run's SuperLink and Ray: {sorted(seen)}"
    )
    assert not exposed, f"listening on a non-loopback address: {sorted(exposed)}"
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
