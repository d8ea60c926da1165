"""A killed node leaves no training process behind.

A site's node is a process tree: ``fedmeta node supernode`` (Flower's SuperNode)
starts ``flower-superexec``, which starts one ``flwr-clientapp`` per message; that
process trains. When the node is killed (SIGKILL, the OOM killer, a crash) nothing
kills the children: Flower's own watch only raises SIGINT in them once it notices,
which a process importing torch or training may not act on (measured: a ClientApp
still alive 10 s after its node was killed), so a "stopped" site could go on
training and writing its ledger and audit log with nobody watching. (systemd's
``KillMode=control-group`` covers a node stopped by systemd, not one killed.)

``fedmeta node supernode`` therefore starts the SuperExec as ``python -m
fedmeta.deploy.lifeline superexec ...``, which starts each ClientApp as ``python -m
fedmeta.deploy.lifeline clientapp ...``. Each first asks the kernel to SIGKILL it
when the thread that started it ends (``prctl(PR_SET_PDEATHSIG)``; both parents
start their children from their main thread) and checks that its parent (Flower's
``--parent-pid``) is still there, then runs Flower's unmodified entry point with the
same arguments (the ClientApp first gets the site's app check,
:mod:`fedmeta.deploy.appcheck`). Killing the node then kills the SuperExec, which
kills the ClientApp, at once. The privacy ledger is charged before training and the audit log is
append-only with fsync: an abrupt end leaves both readable.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1
FLOWER_COMMANDS = {"superexec": "flower-superexec", "clientapp": "flwr-clientapp"}
MODULE = "fedmeta.deploy.lifeline"  # not __name__: that is "__main__" under `python -m`


def die_with_parent(parent_pid: int | None) -> None:
    """SIGKILL this process when the thread that started it ends (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if parent_pid is not None and os.getppid() != parent_pid:  # it died before prctl
        os.kill(os.getpid(), signal.SIGKILL)


def routed(kind: str) -> Callable[[list[str]], list[str]]:
    """Rewrite Flower's ``flower-superexec``/``flwr-clientapp`` command to run through
    this module (same arguments); any other command is left alone."""

    def rewrite(args: list[str]) -> list[str]:
        if args and Path(str(args[0])).name == FLOWER_COMMANDS[kind]:
            return [sys.executable, "-m", MODULE, kind, *map(str, args[1:])]
        return args

    return rewrite


class RoutedSubprocess:
    """Stands in for a Flower module's ``subprocess``: its ``Popen`` goes through
    :func:`routed`; everything else is the real module."""

    def __init__(self, rewrite: Callable[[list[str]], list[str]]) -> None:
        self._rewrite = rewrite

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    def Popen(self, args: Any, *rest: Any, **kwargs: Any) -> subprocess.Popen:  # noqa: N802
        return subprocess.Popen(self._rewrite(list(args)), *rest, **kwargs)


def install_in_supernode() -> None:
    """In the ``fedmeta node supernode`` process: the SuperExec starts through here."""
    import flwr.supernode.start_client_internal as start

    if not hasattr(start, "subprocess"):
        raise RuntimeError(
            "the installed Flower starts its SuperExec differently: install "
            "the Flower version of the coordinator's constraints file"
        )
    start.subprocess = RoutedSubprocess(routed("superexec"))  # type: ignore[attr-defined]


def _parent_pid(args: list[str]) -> int | None:
    for i, arg in enumerate(args):
        if arg == "--parent-pid" and i + 1 < len(args):
            return int(args[i + 1])
        if arg.startswith("--parent-pid="):
            return int(arg.split("=", 1)[1])
    return None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in FLOWER_COMMANDS:
        print(f"usage: python -m {MODULE} superexec|clientapp FLOWER-ARGS...", file=sys.stderr)
        sys.exit(2)
    kind, args = argv[0], argv[1:]
    die_with_parent(_parent_pid(args))
    sys.argv = [FLOWER_COMMANDS[kind], *args]
    if kind == "superexec":
        import flwr.supercore.superexec.executor.subprocess_executor as executor
        from flwr.supercore.cli.flower_superexec import flower_superexec

        executor.subprocess = RoutedSubprocess(routed("clientapp"))  # type: ignore[attr-defined]
        flower_superexec()
    else:
        from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

        from fedmeta.deploy.appcheck import install_in_clientapp

        try:  # the run's app is checked against the site's approvals before it is installed
            install_in_clientapp()
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        flwr_clientapp()


if __name__ == "__main__":
    main()
