"""Fixtures shared across test modules."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import (
    RAY_RUN_SETTINGS,
    RayRun,
    adopting_orphans,
    cli_args,
    fedmeta,
    own_processes,
    shadowing_project,
)


@pytest.fixture(scope="session")
def ray_run(tmp_path_factory: pytest.TempPathFactory) -> RayRun:
    """The suite's real Ray simulation of a bundled task, through the CLI, started from a
    directory with its own ``server.py``, ``clients/`` and ``policies/`` (so the Ray
    workers must import fedmeta's). Read by test_simulation.py (run directory, console,
    leftover processes, same metrics as inline) and test_working_directory.py."""
    base = tmp_path_factory.mktemp("ray")
    cwd = shadowing_project(base / "my-flower-project")
    out = base / "reptile"
    with adopting_orphans():
        before = own_processes()
        res = fedmeta("simulate", *cli_args(RAY_RUN_SETTINGS), "--strategy", "reptile",
                      "--out", str(out), cwd=cwd)
        leftover = {pid: cmd for pid, cmd in own_processes().items() if pid not in before}
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return RayRun(out, res, leftover, cwd)


# ---- `make test` runs the suite on two workers (pytest-xdist, --dist loadgroup) ------------
# Tests that share something run on one worker, in collection order: a module's tests (its
# module-scoped runs), the tests reading one session-scoped run, and every test that starts
# Ray or `flwr run`'s local SuperLink (two at once would compete for the same cores, and,
# where no network namespace can be made, for the same ports).
SHARED_RUNS = ("ray_run", "run_dir")
RAY_MODULES = {"test_simulation.py", "test_working_directory.py", "test_netns.py",
               "test_plugins.py", "test_run_failures.py", "test_flwr_run.py", "test_cuda.py"}


def xdist_group(path: Path, items: list[pytest.Item]) -> str:
    """The worker group of the tests of one module."""
    if path.name in RAY_MODULES:
        return "ray"
    for name in SHARED_RUNS:
        if any(name in getattr(item, "fixturenames", ()) for item in items):
            return name
    return str(path.relative_to(Path(__file__).parent))


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    modules: dict[Path, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.path, []).append(item)
    for path, its in modules.items():
        group = xdist_group(path, its)
        for item in its:
            item.add_marker(pytest.mark.xdist_group(group))
