"""Keep a run off the network: loopback-only Ray, and a network namespace with only ``lo``.

Ray binds its GCS server, raylet, driver and worker ports on its node IP address (on
Linux by default the address of the interface with the default route; its services then
listen on all interfaces) and has no bind-address option of its own. ``ray_on_loopback()``
makes that address 127.0.0.1 (as Ray does on macOS and Windows), so every Ray component
listens on loopback only; it must run before Ray is imported, and the ClientApp module
calls it on import, which is how a run started by ``flwr run`` (Flower's
``flwr-simulation`` process, which loads the ClientApp and then starts Ray in the same
thread) gets it.

Loopback is still open to every local user. ``loopback_only()`` moves the calling
thread into a fresh network namespace whose only interface is ``lo`` (brought up here);
every thread and process that thread starts afterwards (Ray's services, its workers,
Flower's ServerApp thread) inherits it, so whatever they bind can be reached from
inside it only. On leaving the block the thread moves back to its own namespace; the
confined one disappears with its last process.

``unshare(CLONE_NEWNET)`` needs CAP_SYS_ADMIN in the process's user namespace: root,
or, for an unprivileged user, a user namespace of the process's own, which only a
single-threaded process can make (before torch is imported). ``own_user_namespace()``
makes one (the uid and gid map to themselves) together with a loopback-only network
namespace for the whole process, so a whole ``fedmeta simulate`` command runs off the
network, its round callbacks included.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import socket
import struct
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

from fedmeta.paths import ALLOW_NETWORK_ENV  # "1": run Ray in this machine's own network

CLONE_NEWNET = 0x40000000  # linux/sched.h
CLONE_NEWUSER = 0x10000000
SIOCGIFFLAGS = 0x8913  # linux/sockios.h
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
THREAD_NET_NS = "/proc/thread-self/ns/net"
# Ray reads it when imported: "0" makes its node IP address (and so every bind) 127.0.0.1
RAY_LOCAL_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
CAP_SYS_ADMIN = 21  # linux/capability.h
LOCAL_TRACKING_SCHEMES = ("", "file", "sqlite")  # MLflow URIs that need no network

# why this command could not get a user namespace of its own (for the run's warning)
_refused: str | None = None


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


def network_allowed() -> bool:
    """``FEDMETA_ALLOW_NETWORK=1``: the user asked for Ray in the machine's own network."""
    return os.environ.get(ALLOW_NETWORK_ENV) == "1"


def ray_on_loopback() -> bool:
    """Make Ray started from this process (and its children) bind 127.0.0.1 only; with
    ``FEDMETA_ALLOW_NETWORK=1`` a ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` of the user's own
    wins. Effective only before Ray is imported (says so in one line otherwise). Returns
    whether Ray will be on loopback."""
    if network_allowed():
        os.environ.setdefault(RAY_LOCAL_ENV, "0")
    else:
        os.environ[RAY_LOCAL_ENV] = "0"
    local = os.environ[RAY_LOCAL_ENV].strip().lower() in ("0", "false")
    constants = sys.modules.get("ray._private.ray_constants")
    if local and constants is not None and getattr(constants, "ENABLE_RAY_CLUSTER", False):
        import logging

        logging.getLogger(__name__).warning(
            "Ray was imported before fedmeta could bind it to 127.0.0.1: its ports may be "
            "open to the network; set %s=0 in the environment of the command",
            RAY_LOCAL_ENV,
        )
        return False
    return local


def confine_command(backend: str, tracking_uri: str | None = None) -> None:
    """First thing in ``fedmeta simulate``, while the process is single-threaded: without
    CAP_SYS_ADMIN, move the whole command into ``own_user_namespace()``, so that its Ray
    run gets a loopback-only namespace as a root's does. Nothing to do for another
    backend, with ``FEDMETA_ALLOW_NETWORK=1``, as root (the Ray run gets a namespace of its
    own and round callbacks stay in the machine's network), or with a tracking URI that
    needs the network (a remote MLflow server). Where it cannot be done, the reason is
    kept for the run's one-line warning."""
    global _refused
    if backend != "ray" or network_allowed() or _has_sys_admin():
        return
    scheme = urllib.parse.urlsplit(tracking_uri).scheme if tracking_uri else ""
    if scheme.lower() not in LOCAL_TRACKING_SCHEMES:
        _refused = f"--mlflow {tracking_uri} needs this machine's network"
        return
    try:
        own_user_namespace()
    except NamespaceUnavailable as exc:
        _refused = str(exc)


def _has_sys_admin() -> bool:
    """CAP_SYS_ADMIN in the effective set (what ``unshare(CLONE_NEWNET)`` needs)."""
    try:
        with open("/proc/self/status") as fh:
            eff = next(line for line in fh if line.startswith("CapEff:")).split()[1]
    except (OSError, StopIteration):
        return os.geteuid() == 0
    return bool(int(eff, 16) >> CAP_SYS_ADMIN & 1)


def own_user_namespace() -> None:
    """Move this (single-threaded) process into a user namespace of its own (uid and gid
    mapped to themselves) and a network namespace that has only ``lo``; no root needed
    where the kernel allows unprivileged user namespaces. Raises NamespaceUnavailable
    with the reason otherwise (the process is then unchanged)."""
    if sys.platform != "linux":
        raise NamespaceUnavailable(f"network namespaces are Linux-only (this is {sys.platform})")
    uid, gid = os.getuid(), os.getgid()
    if _libc().unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        why = f"{os.strerror(err)} (unprivileged user namespaces are off on this machine, "
        why += "or a container forbids them)"
        if err == errno.EINVAL and len(os.listdir("/proc/self/task")) > 1:
            why = "the process already runs several threads (only a single-threaded one can)"
        raise NamespaceUnavailable(f"unshare(CLONE_NEWUSER|CLONE_NEWNET): {why}")
    for name, text in (
        ("uid_map", f"{uid} {uid} 1"),
        ("setgroups", "deny"),
        ("gid_map", f"{gid} {gid} 1"),
    ):
        with open(f"/proc/self/{name}", "w") as fh:
            fh.write(text)
    _loopback_up()


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
        raise NamespaceUnavailable(
            f"unshare(CLONE_NEWNET): {os.strerror(err)} (needs root, "
            "or a user namespace of the process's own" + (f"; {_refused})" if _refused else ")")
        )
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
