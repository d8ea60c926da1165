"""Fixtures shared across test modules."""

from __future__ import annotations

import pytest
from helpers import (
    FEDMETA,
    RAY_RUN_SETTINGS,
    RayRun,
    adopting_orphans,
    cli_args,
    fedmeta,
    own_processes,
    shadowing_project,
)
from netcheck import ADDRESSED, CAN_ADDRESS, watch_run

from fedmeta.paths import ALLOW_NETWORK_ENV


@pytest.fixture(scope="session")
def ray_run(tmp_path_factory: pytest.TempPathFactory) -> RayRun:
    """The suite's real Ray simulation of a bundled task, through the CLI, started from a
    directory with its own ``server.py``, ``clients/`` and ``policies/`` (so the Ray
    workers must import fedmeta's). As root it runs in a namespace of the test's own that
    looks like a networked machine (``netcheck.ADDRESSED``) and its listening sockets are
    listed while it runs. Read by test_simulation.py: run directory, console, leftover
    processes, same metrics as inline, Ray workers from such a directory, loopback only."""
    base = tmp_path_factory.mktemp("ray")
    cwd = shadowing_project(base / "my-flower-project")
    out = base / "reptile"
    args = ["simulate", *cli_args(RAY_RUN_SETTINGS), "--strategy", "reptile", "--out", str(out)]
    with adopting_orphans():
        before = own_processes()
        if CAN_ADDRESS:
            res, exposed, seen, userns = watch_run(
                [*ADDRESSED, *FEDMETA, *args], {ALLOW_NETWORK_ENV: "0"}, cwd=cwd, timeout=600
            )
        else:  # the listening sockets of other namespaces can be listed by root only
            res, exposed, seen, userns = fedmeta(*args, cwd=cwd), set(), set(), set()
        leftover = {pid: cmd for pid, cmd in own_processes().items() if pid not in before}
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return RayRun(out, res, leftover, cwd, exposed, seen, userns)


def _weight(item: pytest.Item) -> int:
    """Run order: the real deployment first (minutes, mostly waiting on its processes),
    then the other long end-to-end tests, then the quick ones, which fill the gaps."""
    if item.get_closest_marker("deploy"):
        return 0
    if item.get_closest_marker("slow") or item.get_closest_marker("browser"):
        return 1
    return 2


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long tests first (a stable sort: within a weight, collection order stays), so on
    two workers the deployment starts at once instead of being the suite's tail. Under
    ``--dist loadfile`` a module's tests stay together: a module is placed by its
    heaviest test (``make test`` passes ``--no-loadscope-reorder``, or xdist would put
    the modules with the most tests first and the one-test deployment last)."""
    heaviest: dict[str, int] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        heaviest[module] = min(heaviest.get(module, 2), _weight(item))
    items.sort(key=lambda item: heaviest[item.nodeid.split("::")[0]])
