"""fedmeta works from a directory that holds its own ``server.py``, ``clients/`` and
``policies/`` (common in Flower projects): the CLI, the Python API, Ray workers and
`flwr run` all import fedmeta's own packages, never the user's. (Ray workers:
test_simulation.py::test_ray_workers_from_such_a_directory, the suite's Ray run; `flwr run`:
test_plugins.py::test_plugin_through_flwr_run_from_a_directory_with_its_own_modules.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import fedmeta, shadowing_project

SMALL = [
    "--task",
    "breast-cancer-sites",
    "--sites",
    "2",
    "--rounds",
    "1",
    "--set",
    "eval-episodes=3",
    "--set",
    "fraction-train=1.0",
]


@pytest.fixture
def user_dir(tmp_path) -> Path:
    return shadowing_project(tmp_path / "my-flower-project")


def test_the_user_modules_would_shadow_ours(user_dir):
    """The control: plain Python in that directory imports the user's modules."""
    res = subprocess.run(
        [sys.executable, "-c", "import policies"], cwd=user_dir, capture_output=True, text=True
    )
    assert "the user policies/ was imported" in res.stderr


def test_cli_from_a_directory_with_its_own_server_clients_policies(user_dir, tmp_path):
    res = fedmeta(
        "simulate",
        *SMALL,
        "--backend",
        "inline",
        "--out",
        str(tmp_path / "run"),
        cwd=user_dir,
        isolate=False,
    )
    assert res.returncode == 0, res.stdout[-1500:] + res.stderr[-1500:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epsilon"]


def test_api_script_in_such_a_directory(user_dir, tmp_path):
    """``python run.py`` puts the script's directory first on sys.path."""
    (user_dir / "run.py").write_text(
        "from fedmeta.config import RunConfig\n"
        "from fedmeta.simulation import simulate\n"
        f"cfg = RunConfig(task='breast-cancer-sites', sites=2, rounds=1, eval_episodes=3,\n"
        f"                fraction_train=1.0, out_dir={str(tmp_path / 'api')!r})\n"
        "print(sorted(simulate(cfg, backend='inline')['epsilon']))\n"
    )
    res = subprocess.run(
        [sys.executable, "run.py"], cwd=user_dir, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-1500:]
    assert "['site-0', 'site-1']" in res.stdout
