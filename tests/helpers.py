"""Shared test helpers: run the real ``fedmeta`` CLI in a subprocess.

Ray binds its services on all interfaces; when we are root and ``unshare``
exists, simulations run in a fresh network namespace that has only the
loopback interface, so nothing a test starts is reachable from outside.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FEDMETA = [sys.executable, "-m", "fedmeta.cli"]


def loopback_only() -> list[str]:
    if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip"):
        probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
        if probe.returncode == 0:
            return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    return []


def fedmeta(*args: str, timeout: float = 600, cwd: Path | None = None,
            isolate: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = (loopback_only() if isolate else []) + FEDMETA + list(args)
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or ROOT, env=env)
