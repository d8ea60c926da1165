"""A Ray simulation listens on loopback only (README: what a simulation exposes).

The listing (``netcheck``) enters each process's network namespace: a socket bound
to 0.0.0.0 is exposed where that namespace has an interface other than loopback, and
confined where it has none. The real Ray runs it lists: the suite's shared run as root
(test_simulation.py), the plug-in's Ray run without CAP_SYS_ADMIN (test_plugins.py) and
`flwr run` (test_flwr_run.py); here the check itself and the confinement's parts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
from helpers import ROOT
from netcheck import ADDRESSED, NETWORK_MARK, NO_SYS_ADMIN, exposed_listeners, root_only

from fedmeta import netns, simulation
from fedmeta.netns import THREAD_NET_NS, NamespaceUnavailable, loopback_only
from fedmeta.paths import ALLOW_NETWORK_ENV

LISTEN = (
    "import socket, sys\n"
    "servers = [socket.create_server((ip, 0)) for ip in sys.argv[1:]]\n"
    "print('up', flush=True); sys.stdin.read()"
)


@root_only
@pytest.mark.parametrize(
    ("addresses", "flagged"),
    [
        (["0.0.0.0"], ["0.0.0.0"]),
        (["192.0.2.1", "127.0.0.1"], ["192.0.2.1"]),
        (["127.0.0.1"], []),
    ],
)
def test_the_check_flags_what_another_machine_could_reach(addresses, flagged):
    """The check itself, on a process of the test's own in ``ADDRESSED``."""
    proc = subprocess.Popen(
        [*ADDRESSED, sys.executable, "-c", LISTEN, *addresses],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "up"
        exposed, seen = exposed_listeners([proc.pid])
    finally:
        proc.communicate("", timeout=10)
    assert len(seen) == len(addresses)
    assert all(x.endswith(NETWORK_MARK) for x in seen)
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

        threads = [
            threading.Thread(target=where, args=("plain",)),
            threading.Thread(target=jail.wrap(where), args=("outside",)),
        ]
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
    with (
        caplog.at_level(logging.WARNING, logger="fedmeta.simulation"),
        simulation._confined() as jail,
    ):
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


@pytest.mark.parametrize(
    ("backend", "env", "sys_admin", "mlflow", "made", "refused"),
    [
        ("ray", None, False, None, True, None),
        ("ray", None, False, "sqlite:///mlflow.db", True, None),
        ("ray", None, False, "mlruns", True, None),
        ("ray", None, False, "https://mlflow.example.org", False, "needs this machine's network"),
        ("ray", None, True, None, False, None),  # root: the Ray run gets a namespace of its own
        ("ray", "1", False, None, False, None),  # FEDMETA_ALLOW_NETWORK=1
        ("inline", None, False, None, False, None),  # opens no port
    ],
)
def test_which_commands_get_a_user_namespace_of_their_own(
    backend, env, sys_admin, mlflow, made, refused, monkeypatch
):
    calls: list[str] = []
    monkeypatch.setattr(netns, "_has_sys_admin", lambda: sys_admin)
    monkeypatch.setattr(netns, "own_user_namespace", lambda: calls.append("made"))
    monkeypatch.setattr(netns, "_refused", None)
    if env is None:
        monkeypatch.delenv(netns.ALLOW_NETWORK_ENV, raising=False)
    else:
        monkeypatch.setenv(netns.ALLOW_NETWORK_ENV, env)
    netns.confine_command(backend, mlflow)
    assert calls == (["made"] if made else [])
    assert (netns._refused is None) if refused is None else (refused in netns._refused)


def test_a_refused_user_namespace_is_named_in_the_warning(monkeypatch):
    def refuse() -> None:
        raise NamespaceUnavailable(
            "unshare(CLONE_NEWUSER|CLONE_NEWNET): Operation not "
            "permitted (unprivileged user namespaces are off)"
        )

    monkeypatch.setattr(netns, "_has_sys_admin", lambda: False)
    monkeypatch.setattr(netns, "own_user_namespace", refuse)
    monkeypatch.setattr(netns, "_refused", None)
    monkeypatch.delenv(netns.ALLOW_NETWORK_ENV, raising=False)
    netns.confine_command("ray")
    assert "unprivileged user namespaces are off" in netns._refused


PROBE = """
import os, socket, sys, threading
import psutil
from fedmeta.netns import NamespaceUnavailable, loopback_only, own_user_namespace
try:
    with loopback_only():
        pass
except NamespaceUnavailable:
    print("no netns without the user namespace")
if sys.argv[1] == "threaded":
    threading.Thread(target=threading.Event().wait, daemon=True).start()
try:
    own_user_namespace()
except NamespaceUnavailable as exc:
    print("refused:", exc)
    raise SystemExit(0)
print("uid", os.getuid(), "gid", os.getgid(), "interfaces", ",".join(sorted(psutil.net_if_addrs())))
threading.Thread(target=threading.Event().wait, daemon=True).start()  # as torch does
with loopback_only() as jail:
    server = socket.create_server(("0.0.0.0", 0))
    socket.create_connection(("127.0.0.1", server.getsockname()[1])).close()
    print("confined thread", ",".join(sorted(psutil.net_if_addrs())))
print("back", os.readlink("/proc/thread-self/ns/net") == os.readlink("/proc/self/ns/net"))
open(sys.argv[2], "w").write("x")
"""


@root_only
@pytest.mark.parametrize("threads", ["single", "threaded"])
def test_without_cap_sys_admin_a_process_makes_its_own_namespaces(threads, tmp_path):
    """Without CAP_SYS_ADMIN no network namespace can be made in the machine's user
    namespace; a single-threaded process makes a user namespace of its own (ids mapped to
    themselves, files it writes owned by the real uid) and a loopback-only network
    namespace, and can then make more, as root does; a threaded one is refused with the
    reason."""
    out = tmp_path / "written"
    res = subprocess.run(
        [*NO_SYS_ADMIN, sys.executable, "-c", PROBE, threads, str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "no netns without the user namespace"
    if threads == "threaded":
        assert lines[1].startswith("refused:") and "several threads" in lines[1]
        return
    assert lines[1:] == [
        f"uid {os.getuid()} gid {os.getgid()} interfaces lo",
        "confined thread lo",
        "back True",
    ]
    assert out.stat().st_uid == os.getuid()


def test_the_command_line_starts_single_threaded():
    """Without root, `fedmeta simulate` can enter a user namespace only while its process
    has one thread: importing the command line must start none (numpy's BLAS pool, torch
    and Ray start threads), or the confinement is silently refused."""
    probe = (
        "import os, sys\n"
        "import fedmeta.cli\n"
        "print(len(os.listdir('/proc/self/task')), "
        "sorted(m for m in ('numpy', 'torch', 'ray', 'flwr') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.split("\n")[0] == "1 []", out.stdout + out.stderr
