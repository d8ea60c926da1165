"""Keep a run off the network: a Linux network namespace that has only loopback.

Ray binds its GCS server, raylet and worker ports on its node IP address (on
Linux by default the machine's address on the network) and has no bind-address
option of its own. ``loopback_only()`` moves the calling thread into
a fresh network namespace whose only interface is ``lo`` (brought up here); every
thread and process that thread starts afterwards (Ray's services, its workers,
Flower's ServerApp thread) inherits it, so whatever they bind can be reached
from this machine's loopback namespace only, i.e. not at all from outside.
On leaving the block the thread moves back to its own namespace; the confined
one disappears with its last process.

It needs CAP_SYS_ADMIN (root): ``unshare(CLONE_NEWNET)`` is per thread, while
``unshare(CLONE_NEWUSER)``, how an unprivileged user gets a namespace of their
own, is refused to a multi-threaded process such as one that imported torch.
An unprivileged user runs the whole command in one instead:
``unshare -rn sh -c 'ip link set lo up && exec fedmeta simulate ...'``.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import socket
import struct
import sys
from collections.abc import Callable, Iterator
from typing import Any

CLONE_NEWNET = 0x40000000  # linux/sched.h
SIOCGIFFLAGS = 0x8913  # linux/sockios.h
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
THREAD_NET_NS = "/proc/thread-self/ns/net"


class NamespaceUnavailable(OSError):
    """No network namespace of our own can be made here (one line says why)."""


class Confinement:
    """The namespace a block runs in, and the way back out of it for callbacks."""

    def __init__(self, home_fd: int, jail_fd: int) -> None:
        self._home = home_fd
        self._jail = jail_fd

    @contextlib.contextmanager
    def outside(self) -> Iterator[None]:
        """Run the block (in the calling thread) in the namespace the run started from,
        e.g. a round callback that logs to a remote MLflow server."""
        _setns(self._home)
        try:
            yield
        finally:
            _setns(self._jail)

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn``, called outside the confinement."""
        def outside_call(*args: Any, **kwargs: Any) -> Any:
            with self.outside():
                return fn(*args, **kwargs)
        return outside_call


@contextlib.contextmanager
def loopback_only() -> Iterator[Confinement]:
    """Run the block (and whatever it starts) in a new, loopback-only network namespace.
    Raises NamespaceUnavailable where that cannot be done."""
    if sys.platform != "linux":
        raise NamespaceUnavailable(f"network namespaces are Linux-only (this is {sys.platform})")
    try:
        home = os.open(THREAD_NET_NS, os.O_RDONLY)
    except OSError as exc:
        raise NamespaceUnavailable(f"{THREAD_NET_NS}: {exc.strerror}") from exc
    if _libc().unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        os.close(home)
        raise NamespaceUnavailable(f"unshare(CLONE_NEWNET): {os.strerror(err)} (needs root)")
    jail = os.open(THREAD_NET_NS, os.O_RDONLY)
    try:
        _loopback_up()
        yield Confinement(home, jail)
    finally:
        _setns(home)
        os.close(home)
        os.close(jail)


def _loopback_up() -> None:
    """``ip link set lo up`` in the calling thread's namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        req = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(sock, SIOCGIFFLAGS, req)[:18])[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def _setns(fd: int) -> None:
    if _libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def entered(pid: int) -> Iterator[None]:
    """Run the block (in the calling thread) in process ``pid``'s network namespace, e.g.
    to list what it listens on; root only. In the main thread, ``/proc/net`` (what
    psutil reads) follows."""
    home = os.open(THREAD_NET_NS, os.O_RDONLY)
    try:
        target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)
