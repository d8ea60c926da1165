"""Which code ran: a hash of the app a process was started from.

In a deployment Flower installs the run's app (FAB) under ``$FLWR_HOME/apps/
<publisher>.<name>.<version>.<hash8>/`` and imports it from there, at the
coordinator and at every site. :func:`app_sha256` hashes the Python sources and
``pyproject.toml`` of the app this module was imported from (sorted relative paths
and their SHA-256s), so the server's ``run.start`` and each site's ``run.app`` entry
say which code each side ran; :func:`fab_hash_prefix` is the FAB hash prefix
Flower put in the directory name, where there is one.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from pathlib import Path

APP_PACKAGES = ("clients", "server", "fedmeta", "policies")
_FAB_DIR = re.compile(r".+\.[0-9a-f]{8}$")


def app_root() -> Path:
    return Path(__file__).resolve().parents[2]


@lru_cache(maxsize=1)
def app_sha256(root: Path | None = None) -> str:
    root = Path(root) if root is not None else app_root()
    files = [root / "pyproject.toml"] if (root / "pyproject.toml").is_file() else []
    for pkg in APP_PACKAGES:
        files += [p for p in (root / pkg).rglob("*.py") if "__pycache__" not in p.parts]
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(f"{path.relative_to(root).as_posix()}\0".encode())
        h.update(hashlib.sha256(path.read_bytes()).hexdigest().encode() + b"\n")
    return h.hexdigest()


def fab_hash_prefix(root: Path | None = None) -> str | None:
    name = (Path(root) if root is not None else app_root()).name
    return name.rsplit(".", 1)[1] if _FAB_DIR.fullmatch(name) else None
