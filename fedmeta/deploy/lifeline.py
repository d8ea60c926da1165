"""A deployed ClientApp process dies with the node that started it.

In a deployment every message runs in a fresh ``flwr-clientapp`` process, a child of
the SuperNode's ``flower-superexec``, itself a child of ``fedmeta node supernode``.
When the node is killed (SIGKILL, OOM killer, a crash) nothing signals that child:
Flower only asks its processes to stop with SIGINT once it notices, which a process in
the middle of training may not act on, so a "stopped" site could go on training and
writing to its ledger and audit log with nobody watching. :func:`hold_lifeline`
starts a watcher thread in the ClientApp process: as soon as its parent or the node
above it is gone (or its pid was reused), the process kills itself with SIGKILL. The
privacy ledger is charged before training and the audit log is append-only with
fsync, so an abrupt end leaves both readable (a torn last line is what ``fedmeta
audit repair`` is for).
"""

from __future__ import annotations

import os
import signal
import threading

_started = False
NODE_MARKERS = ("supernode",)  # `fedmeta node supernode`, `flower-supernode`


def _ancestors() -> list[tuple[int, float]]:
    """(pid, start time) of the parent up to and including the node process; [] when no
    node process is among the nearest ancestors (a simulation, a test, a ClientApp run by
    hand): then there is nothing to watch."""
    import psutil

    out: list[tuple[int, float]] = []
    proc = psutil.Process().parent()
    while proc is not None and proc.pid > 1 and len(out) < 4:
        try:
            out.append((proc.pid, proc.create_time()))
            if any(m in " ".join(proc.cmdline()) for m in NODE_MARKERS):
                return out
            proc = proc.parent()
        except psutil.Error:
            break
    return []


def _alive(pid: int, started: float) -> bool:
    import psutil

    try:
        return psutil.Process(pid).create_time() == started
    except psutil.Error:
        return False


def hold_lifeline(interval: float = 0.25) -> bool:
    """Watch the node above this process; SIGKILL this process when it is gone. Returns
    whether a watcher runs (once per process; none without a node above it)."""
    global _started
    if _started:
        return True
    watched = _ancestors()
    if not watched:
        return False

    def watch() -> None:
        import time

        while True:
            time.sleep(interval)
            if not all(_alive(pid, t) for pid, t in watched):
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="fedmeta-lifeline", daemon=True).start()
    _started = True
    return True
