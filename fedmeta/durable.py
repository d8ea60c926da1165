"""Durable appends: a line is on disk before the call returns.

The run's metrics, a site's approvals (of run declarations and of app hashes) and its
privacy ledger are append-only JSON-lines files that must survive a crash right
after a write: :func:`append_line` writes the whole line on a descriptor opened
for appending and ``fsync``-s it (:func:`write_line`, which the privacy ledger also
uses on the descriptor it holds locked), and when the call created the file,
``fsync``-s its directory too (so the new name survives as well).
The signed audit log has its own locked writer (:mod:`fedmeta.audit.log`) built on
the same :func:`fsync_dir`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["append_json_line", "append_line", "fsync_dir", "json_line", "write_all", "write_line"]


def fsync_dir(directory: Path) -> None:
    """fsync a directory so a file just created or renamed in it survives a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_line(path: Path, line: str) -> int:
    """Append ``line`` (a newline is added; it must not hold one) and fsync it; returns
    the bytes written."""
    data = _line_bytes(line)  # refused before the file is touched
    path = Path(path)
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        size = _write_all(fd, data)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)
    return size


def write_line(fd: int, line: str) -> int:
    """Write ``line`` and a newline to ``fd`` (opened for appending) and fsync it; returns
    the bytes written. A line break inside ``line`` is refused before anything is written."""
    return _write_all(fd, _line_bytes(line))


def _line_bytes(line: str) -> bytes:
    if "\n" in line or "\r" in line:
        raise ValueError("append_line: the line holds a line break")
    return (line + "\n").encode("utf-8")


def _write_all(fd: int, data: bytes) -> int:
    write_all(fd, data)
    os.fsync(fd)
    return len(data)


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a regular file may take a short write)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # pragma: no cover - os.write raises instead on real errors
            raise OSError("write returned 0 bytes")
        view = view[n:]


def append_json_line(path: Path, record: Any, *, compact: bool = False) -> int:
    """Append ``record`` as one JSON line (keys sorted; ``compact``: no spaces) and
    fsync it; returns the bytes written."""
    return append_line(path, json_line(record, compact=compact))


def json_line(record: Any, *, compact: bool = False) -> str:
    """``record`` as the one JSON line ``append_json_line`` writes."""
    separators = (",", ":") if compact else None
    return json.dumps(record, sort_keys=True, separators=separators)
