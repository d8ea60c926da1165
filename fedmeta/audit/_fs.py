"""Small durable-file helpers shared by the key store and the log."""

from __future__ import annotations

import os
from pathlib import Path

from fedmeta.durable import fsync_dir, write_all

__all__ = ["fsync_dir", "make_dirs", "write_all", "write_new_file"]


def make_dirs(directory: Path, mode: int = 0o777) -> None:
    """mkdir -p, then fsync the parent of every directory it created (durable entries)."""
    missing = []
    d = Path(directory)
    while not d.exists():
        missing.append(d)
        d = d.parent
    if missing:
        Path(directory).mkdir(mode=mode, parents=True, exist_ok=True)
        for m in reversed(missing):
            fsync_dir(m.parent)


def write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (must not exist) with ``mode`` from the start, write, fsync, close.

    The mode is given to ``os.open`` so the file never exists with wider permissions
    (the umask can only narrow it); there is no chmod after writing.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
