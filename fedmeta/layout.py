"""Keep fedmeta's own top-level packages first on ``sys.path``, whatever the cwd holds.

The project's layout puts four packages at the top level: ``fedmeta``, ``server``,
``clients`` and ``policies``. Python puts the current directory first on
``sys.path`` for ``python -m ...``, ``python script.py`` and interactive use, and
Flower's ``load_app`` inserts the current directory at the front before importing
an app by name (``server.app:app``); Ray's workers inherit that order through
``PYTHONPATH``. A user's directory holding its own ``server.py``, ``clients/`` or
``policies/`` (common in Flower projects) then shadows ours: ``No module named
'server.app'; 'server' is not a package``. Even a folder without ``__init__.py``
does, when fedmeta is installed in editable mode (its packages are then found by
an import hook consulted after ``sys.path``).

``protect()`` (run when ``fedmeta`` is imported) checks whether an entry of
``sys.path`` before the directory fedmeta is installed in would shadow one of
these packages; only then does it move the install directory to the front, and
keep the current directory on the path (at the end) so that Flower does not put
it back in front. Nothing changes for a user whose directory shadows nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fedmeta", "server", "clients", "policies")


def _entry_dir(entry: str) -> Path | None:
    try:
        return Path(entry or os.getcwd()).resolve()
    except OSError:
        return None


def _provides(directory: Path, name: str) -> bool:
    """A module, a package or a plain folder (a namespace portion: with an editable install,
    whose packages are not on sys.path, even that wins over ours)."""
    return (directory / f"{name}.py").is_file() or (directory / name).is_dir()


def shadowing(path: list[str] | None = None) -> list[str]:
    """``dir/name`` of every module or package on ``path`` (default ``sys.path``) that
    comes before fedmeta's install directory and has the name of one of its packages."""
    found = []
    for entry in sys.path if path is None else path:
        directory = _entry_dir(entry)
        if directory is None:
            continue
        if directory == ROOT:
            break
        found += [f"{directory}/{n}" for n in PACKAGES if _provides(directory, n)]
    return found


def protect() -> list[str]:
    """Put fedmeta's install directory first if something would shadow its packages;
    returns what would have shadowed them (empty: nothing changed)."""
    shadows = shadowing()
    if not shadows or not all((ROOT / n).is_dir() for n in PACKAGES):
        return shadows
    sys.path[:] = [str(ROOT)] + [e for e in sys.path if _entry_dir(e) != ROOT]
    cwd = str(Path.cwd().absolute())
    if cwd not in sys.path:
        sys.path.append(cwd)  # present, so Flower's load_app does not insert it first
    return shadows
