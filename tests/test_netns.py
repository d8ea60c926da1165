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
from fedmeta.netns import THREAD_NET_NS, NamespaceUnavailable, entered, loopback_only
from fedmeta.paths import ALLOW_NETWORK_ENV

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


def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is loopback too
    return mapped or addr


def _non_loopback(ip: str) -> bool:
    return not _address(ip).is_loopback


def exposed_listeners(pid: int) -> tuple[list[str], list[str]]:
    """Listening inet sockets of ``pid`` and its descendants that another machine could
    reach, and all their listening sockets ("pid name addr:port", + " [ns with a network]"
    for one in a namespace that has a non-loopback address)."""
    try:
        tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return [], []
    exposed: list[str] = []
    seen: list[str] = []
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied,
                                 FileNotFoundError, ProcessLookupError):
            with entered(proc.pid):
                own = [ip for addrs in psutil.net_if_addrs().values() for a in addrs
                       if a.family in (socket.AF_INET, socket.AF_INET6)
                       for ip in [a.address] if _non_loopback(ip)]
                listening = [c for c in proc.net_connections(kind="inet")
                             if c.status == psutil.CONN_LISTEN]
            for conn in listening:
                ip = conn.laddr.ip
                wildcard = _address(ip).is_unspecified
                where = f"{proc.pid} {proc.name()} {ip}:{conn.laddr.port}"
                seen.append(where + (" [ns with a network]" if own else ""))
                if (wildcard and own) or (not wildcard and _non_loopback(ip)):
                    exposed.append(where)
    return exposed, seen


def watch_run(out: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str],
                                                         set[str], set[str]]:
    """Run a small Ray simulation (in ``ADDRESSED``) and list its listening sockets every
    half second."""
    proc = subprocess.Popen([*ADDRESSED, *FEDMETA, *RUN, "--out", str(out)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "COLUMNS": "200", **env})
    exposed: set[str] = set()
    seen: set[str] = set()
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        found, listening = exposed_listeners(proc.pid)
        exposed.update(found)
        seen.update(listening)
        time.sleep(0.5)
    stdout, stderr = proc.communicate(timeout=60)
    print("listening:", *sorted(seen), sep="\n  ")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), exposed, seen


@root_only
@pytest.mark.slow
def test_a_ray_simulation_listens_on_loopback_only(tmp_path):
    res, exposed, seen = watch_run(tmp_path / "run", {ALLOW_NETWORK_ENV: "0"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(seen) >= 2, "Ray's GCS and raylet were never seen listening: the check saw nothing"
    assert not exposed, f"listening on a non-loopback address: {sorted(exposed)}"
    # and confined: a Ray component binding 0.0.0.0 would be reachable on loopback only
    assert not [x for x in seen if x.endswith("[ns with a network]")], sorted(seen)
    assert "open in this machine's network" not in res.stderr


LISTEN = ("import socket, sys\n"
          "servers = [socket.create_server((ip, 0)) for ip in sys.argv[1:]]\n"
          "print('up', flush=True); sys.stdin.read()")


@root_only
@pytest.mark.parametrize(("addresses", "flagged"), [
    (["0.0.0.0"], ["0.0.0.0"]), (["192.0.2.1", "127.0.0.1"], ["192.0.2.1"]),
    (["127.0.0.1"], []),
])
def test_the_check_flags_what_another_machine_could_reach(addresses, flagged):
    """The check itself, on a process of the test's own in ``ADDRESSED``."""
    proc = subprocess.Popen([*ADDRESSED, sys.executable, "-c", LISTEN, *addresses],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        exposed, seen = exposed_listeners(proc.pid)
    finally:
        proc.communicate("", timeout=10)
    assert len(seen) == len(addresses)
    assert all(x.endswith("[ns with a network]") for x in seen)
    assert sorted(e.split()[-1].rsplit(":", 1)[0] for e in exposed) == flagged


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


@pytest.mark.parametrize("why", ["opt-out", "not root"])
def test_without_a_namespace_the_run_says_what_is_exposed(why, monkeypatch, caplog):
    if why == "opt-out":
        monkeypatch.setenv(ALLOW_NETWORK_ENV, "1")
        reason = f"{ALLOW_NETWORK_ENV}=1"
    else:
        monkeypatch.delenv(ALLOW_NETWORK_ENV, raising=False)
        reason = "unshare(CLONE_NEWNET): Operation not permitted (needs root)"

        @contextlib.contextmanager
        def refused():
            raise NamespaceUnavailable(reason)
            yield

        monkeypatch.setattr(simulation, "loopback_only", refused)
    with (caplog.at_level(logging.WARNING, logger="fedmeta.simulation"),
          simulation._confined() as jail):
        assert jail is None
    (line,) = [r.getMessage() for r in caplog.records]
    assert "open in this machine's network" in line and reason in line
    assert "--backend inline" in line and "\n" not in line


@root_only
def test_simulate_confines_the_ray_run_and_calls_back_from_outside(tmp_path, monkeypatch):
    """``simulate(backend="ray")``'s wiring, with the Ray run replaced by a stand-in that
    notes where it runs and emits one round from a thread it starts (as Flower's
    ServerApp thread does)."""
    from fedmeta import rounds
    from fedmeta.config import RunConfig
    from fedmeta.paths import SUMMARY_FILE

    home = os.readlink(THREAD_NET_NS)
    where: dict[str, str] = {}

    def stand_in(cfg: RunConfig) -> None:
        where["run"] = os.readlink(THREAD_NET_NS)
        where["interfaces"] = ",".join(sorted(psutil.net_if_addrs()))
        server = threading.Thread(target=rounds.emit, args=({"round": 1},))
        server.start()
        server.join()
        (Path(cfg.out_dir) / SUMMARY_FILE).write_text('{"status": "completed"}')

    def on_round(metrics: rounds.RoundMetrics) -> None:
        where["callback"] = os.readlink(THREAD_NET_NS)

    monkeypatch.delenv(ALLOW_NETWORK_ENV, raising=False)
    monkeypatch.setattr(simulation, "_simulate_ray", stand_in)
    cfg = RunConfig.from_flat({"out-dir": str(tmp_path / "run")}, source="test")
    assert simulation.simulate(cfg, on_round=on_round) == {"status": "completed"}
    assert where["run"] != home and where["interfaces"] == "lo"
    assert where["callback"] == home
    assert os.readlink(THREAD_NET_NS) == home
