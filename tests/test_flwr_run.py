"""`flwr run APP`: the same ServerApp/ClientApp through Flower's own CLI and local SuperLink,
for a plug-in task (examples/plugin), started from a directory whose ``server.py``,
``clients/`` and ``policies/`` would shadow fedmeta's (test_working_directory.py): the
ServerApp and the ClientApps in Ray's workers resolve the plug-in and import fedmeta's own
packages, never the user's. While it runs, none of its processes (the local SuperLink,
Flower's flwr-simulation process, Ray's services and workers) listens where another
machine could reach it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    MODEL,
    ROOT,
    TASK_EP,
    copy_project,
    install_example_plugin,
    processes_with_env,
    shadowing_project,
    shadows_in,
)
from netcheck import ADDRESSED, CAN_ADDRESS, exposed_listeners

from fedmeta.offline import OFFLINE_ENV
from fedmeta.paths import RunPaths

pytestmark = pytest.mark.slow


def test_flwr_run_local_simulation_of_a_plugin_from_a_directory_with_its_own_modules(tmp_path):
    install_example_plugin()
    app = copy_project(tmp_path / "app")
    user_dir = shadowing_project(tmp_path / "my-flower-project")
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
        str(app),
        "--stream",
        "--run-config",
        f'rounds=2 eval-episodes=3 task="{TASK_EP}" model="{MODEL}"',
    ]
    exposed: set[str] = set()
    seen: set[str] = set()

    def look(pid: int) -> None:
        found, listening = exposed_listeners([pid, *processes_with_env("FLWR_HOME", flwr_home)])
        exposed.update(found)
        seen.update(listening)

    # out-dir = "runs/flwr/{run}": a directory per run, relative to where flwr was started
    runs = user_dir / "runs" / "flwr"
    proc: subprocess.Popen[str] | None = None
    try:
        with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
            proc = subprocess.Popen(cmd, cwd=user_dir, env=env, stdout=out, stderr=err, text=True)
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
    (summary,) = runs.glob("*/summary.json")  # Flower runs the app in the caller's cwd
    data = json.loads(summary.read_text())
    assert summary.parent.name == data["run"]
    assert data["task"] == TASK_EP and data["rounds"] == 2
    assert data["sites"] == ["site-0", "site-1"] and data["dp"] is True
    assert set(data["epsilon"]) == {"site-0", "site-1"}
    lines = RunPaths(summary.parent).metrics.read_text().splitlines()
    assert len(lines) == 3
    assert (app / "pyproject.toml").read_bytes() == (ROOT / "pyproject.toml").read_bytes()
    assert shadows_in(user_dir)
