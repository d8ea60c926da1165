"""What a run's processes listen on, and whether another machine could reach it.

psutil reads a process's sockets from ``/proc/net``, i.e. the namespace of the
reader, so the listing enters each process's network namespace first (root) when it
is not the reader's own: a socket bound to 0.0.0.0 is exposed where that namespace
has an interface with an address other than loopback, and confined where it has none.

``ADDRESSED`` runs a command in a namespace of the test's own that looks like a
machine on a network (an extra address and a default route on ``lo``; Ray picks its
node address from the default route), without opening anything on this machine's
network.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest

from fedmeta.netns import THREAD_NET_NS, entered

ADDRESSED = [
    "unshare",
    "-n",
    "sh",
    "-c",
    "ip link set lo up && ip addr add 192.0.2.1/32 dev lo && "
    'ip route add default dev lo src 192.0.2.1 && exec "$@"',
    "sh",
]
CAN_ADDRESS = (
    sys.platform == "linux"
    and os.geteuid() == 0
    and bool(shutil.which("unshare") and shutil.which("ip"))
)
# root without CAP_SYS_ADMIN: what an unprivileged user has for namespaces (it can make
# a user namespace, not a network namespace in the machine's); the test's files stay
# readable, as they would not be to another uid
NO_SYS_ADMIN = ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin"]
root_only = pytest.mark.skipif(not CAN_ADDRESS, reason="needs Linux, root, unshare and ip")
NETWORK_MARK = " [ns with a network]"


def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is loopback too
    return mapped or addr


def _non_loopback(ip: str) -> bool:
    return not _address(ip).is_loopback


@contextlib.contextmanager
def _in_net_of(pid: int):
    """Read ``/proc/net`` as ``pid`` sees it: enter its namespace if it is not ours."""
    if os.readlink(f"/proc/{pid}/ns/net") == os.readlink(THREAD_NET_NS):
        yield
    else:
        with entered(pid):
            yield


def exposed_listeners(pids: Iterable[int]) -> tuple[list[str], list[str]]:
    """Listening inet sockets of ``pids`` and their descendants that another machine
    could reach, and all their listening sockets ("pid name addr:port", with
    ``NETWORK_MARK`` for one in a namespace that has a non-loopback address)."""
    tree: dict[int, psutil.Process] = {}
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            top = psutil.Process(pid)
            for proc in [top, *top.children(recursive=True)]:
                tree[proc.pid] = proc
    exposed: list[str] = []
    seen: list[str] = []
    for proc in tree.values():
        with contextlib.suppress(
            psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, ProcessLookupError
        ):
            with _in_net_of(proc.pid):
                own = [
                    ip
                    for addrs in psutil.net_if_addrs().values()
                    for a in addrs
                    if a.family in (socket.AF_INET, socket.AF_INET6)
                    for ip in [a.address]
                    if _non_loopback(ip)
                ]
                listening = [
                    c for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
                ]
            for conn in listening:
                ip = conn.laddr.ip
                wildcard = _address(ip).is_unspecified
                where = f"{proc.pid} {proc.name()} {ip}:{conn.laddr.port}"
                seen.append(where + (NETWORK_MARK if own else ""))
                if (wildcard and own) or (not wildcard and _non_loopback(ip)):
                    exposed.append(where)
    return exposed, seen


class Watched(NamedTuple):
    """A command run by :func:`watch_run` and what its processes listened on."""

    res: subprocess.CompletedProcess[str]
    exposed: set[str]  # listening where another machine could reach it
    seen: set[str]  # every listening socket ("pid name addr:port")
    userns: set[str]  # the user namespaces of its main process


def watch_run(
    cmd: list[str], env: dict[str, str], cwd: Path | None = None, timeout: float = 300
) -> Watched:
    """Run ``cmd`` (root: typically in ``ADDRESSED``) and list its listening sockets every
    half second; also the user namespaces of its main process once something listens."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1", **env},
    )
    exposed: set[str] = set()
    seen: set[str] = set()
    userns: set[str] = set()
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        found, listening = exposed_listeners([proc.pid])
        exposed.update(found)
        seen.update(listening)
        if listening:  # Ray is up: the command has made its namespaces by now
            with contextlib.suppress(OSError):
                userns.add(os.readlink(f"/proc/{proc.pid}/ns/user"))
        time.sleep(0.5)
    stdout, stderr = proc.communicate(timeout=60)
    print("listening:", *sorted(seen), sep="\n  ")
    res = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return Watched(res, exposed, seen, userns)
