"""A Ray simulation listens on loopback only (README: what a Ray simulation exposes).

psutil reads a process's sockets from ``/proc/net``, i.e. the namespace of the
reader, so the listing enters each process's network namespace first: a socket
bound to 0.0.0.0 is exposed where that namespace has an interface other than
loopback, and confined where it has none.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from helpers import FEDMETA, ROOT

from fedmeta import simulation
from fedmeta.netns import THREAD_NET_NS, entered, loopback_only

root_only = pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0
                               or not (shutil.which("unshare") and shutil.which("ip")),
                               reason="needs Linux, root, unshare and ip")
# a namespace of the test's own whose loopback interface also holds a documentation
# address: something bound to 0.0.0.0 there is reachable beyond loopback, as on a machine
# with a network card, without opening anything on this machine's network
ADDRESSED = ["unshare", "-n", "sh", "-c",
             'ip link set lo up && ip addr add 192.0.2.1/32 dev lo && exec "$@"', "sh"]
RUN = ["simulate", "--task", "digits-fewshot", "--sites", "2", "--rounds", "1", "--seed", "3",
       "--set", "eval-every=0", "--set", "eval-episodes=2", "--set", "adapt-steps=2"]


def _non_loopback(ip: str) -> bool:
    return not ipaddress.ip_address(ip.split("%")[0]).is_loopback


def exposed_listeners(pid: int) -> tuple[list[str], int]:
    """Listening inet sockets of ``pid`` and its descendants that another machine could
    reach ("pid name addr:port"), and how many listening sockets were seen in all."""
    try:
        tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return [], 0
    exposed: list[str] = []
    seen = 0
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied,
                                 FileNotFoundError, ProcessLookupError):
            with entered(proc.pid):
                own = [ip for addrs in psutil.net_if_addrs().values() for a in addrs
                       if a.family in (socket.AF_INET, socket.AF_INET6)
                       for ip in [a.address] if _non_loopback(ip)]
                listening = [c for c in proc.net_connections(kind="inet")
                             if c.status == psutil.CONN_LISTEN]
            seen += len(listening)
            for conn in listening:
                ip = conn.laddr.ip
                wildcard = ipaddress.ip_address(ip.split("%")[0]).is_unspecified
                if (wildcard and own) or (not wildcard and _non_loopback(ip)):
                    exposed.append(f"{proc.pid} {proc.name()} {ip}:{conn.laddr.port}")
    return exposed, seen


def watch_run(out: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str],
                                                         set[str], int]:
    """Run a small Ray simulation (in ``ADDRESSED``) and list its listening sockets every
    half second."""
    proc = subprocess.Popen([*ADDRESSED, *FEDMETA, *RUN, "--out", str(out)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "COLUMNS": "200", **env})
    exposed: set[str] = set()
    most = 0
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        found, seen = exposed_listeners(proc.pid)
        exposed.update(found)
        most = max(most, seen)
        time.sleep(0.5)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), exposed, most


@root_only
@pytest.mark.slow
def test_a_ray_simulation_listens_on_loopback_only(tmp_path):
    res, exposed, seen = watch_run(tmp_path / "run", {simulation.ALLOW_NETWORK_ENV: "0"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert seen >= 2, "Ray's GCS and raylet were never seen listening: the check saw nothing"
    assert not exposed, f"listening on a non-loopback address: {sorted(exposed)}"
    assert "listen on all interfaces" not in res.stderr


@root_only
@pytest.mark.slow
def test_the_check_sees_a_ray_run_that_is_not_confined(tmp_path):
    """With the opt-out, Ray listens on all interfaces of a namespace that has a
    non-loopback address, and the check says so."""
    res, exposed, _ = watch_run(tmp_path / "run", {simulation.ALLOW_NETWORK_ENV: "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert exposed, "an unconfined Ray run was not seen listening beyond loopback"
    assert "listen on all interfaces" in res.stderr


@root_only
def test_loopback_only_confines_the_thread_and_what_it_starts():
    home = os.readlink(THREAD_NET_NS)
    with loopback_only() as jail:
        inside = os.readlink(THREAD_NET_NS)
        assert inside != home
        assert set(psutil.net_if_addrs()) == {"lo"}
        with socket.create_server(("0.0.0.0", 0)) as server:  # reachable on loopback
            socket.create_connection(("127.0.0.1", server.getsockname()[1])).close()
        seen: dict[str, str] = {}

        def where(key: str) -> None:
            seen[key] = os.readlink(THREAD_NET_NS)

        threads = [threading.Thread(target=where, args=("plain",)),
                   threading.Thread(target=jail.wrap(where), args=("outside",))]
        for t in threads:
            t.start()
            t.join()
        child = subprocess.run(["readlink", "/proc/self/ns/net"], capture_output=True, text=True)
        assert seen == {"plain": inside, "outside": home}
        assert child.stdout.strip() == inside
    assert os.readlink(THREAD_NET_NS) == home


def test_without_a_namespace_the_run_says_what_is_exposed(monkeypatch, caplog):
    monkeypatch.setenv(simulation.ALLOW_NETWORK_ENV, "1")
    with (caplog.at_level(logging.WARNING, logger="fedmeta.simulation"),
          simulation._confined() as jail):
        assert jail is None
    (line,) = [r.getMessage() for r in caplog.records]
    assert "listen on all interfaces" in line and "FEDMETA_ALLOW_NETWORK=1" in line
    assert "\n" not in line
