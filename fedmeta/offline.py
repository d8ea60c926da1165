"""Flower, Ray and fedmeta must never call home from a hospital's machine.

``no_call_home()`` sets the switches documented by Flower and Ray (telemetry,
update checks, runtime dependency installation, Ray usage stats). Every
fedmeta entry point calls it before Flower is imported or started.
"""

from __future__ import annotations

import logging
import os

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
}


def no_call_home() -> None:
    """Force the offline switches in this process and every child it starts."""
    os.environ.update(OFFLINE_ENV)


def quiet_flower(level: int = logging.WARNING) -> None:
    """Keep Flower's per-round INFO logging off the console (fedmeta prints its own),
    unless a fedmeta command already chose what is shown (``fedmeta.logs.configure``)."""
    from fedmeta.logs import configured

    if not configured():
        logging.getLogger("flwr").setLevel(level)


no_call_home()
