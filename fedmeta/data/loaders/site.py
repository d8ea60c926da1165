"""Where a site's data is read from (it is never copied into the coordinator's run dir).

1. a deployed node: the path its node config names (``data="/srv/data/cohort"``),
   else its own site directory;
2. a simulated site: the run's ``data-dir`` (a folder of per-site folders
   ``site-0``, ``site-1``, ...), else its own directory under the run directory.

A deployed site never reads a path the coordinator's run config names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedmeta.data.loaders import DataError, Loaded, find_site_data, load_data


def site_data_folder(data_dir: str | Path, site_index: int) -> Path:
    """A simulated site's folder inside the run's ``data-dir``."""
    return Path(data_dir) / f"site-{site_index}"


def load_site_records(
    task: Any,
    site_dir: Path,
    site_index: int,
    cfg: Any,
    data_path: Path | str | None = None,
    simulated: bool | None = None,
) -> Loaded | None:
    """The site's records, or None when it has no data of its own (a bundled task).
    Checked against the task's agreed shape when the task has a ``check`` method."""
    if data_path:
        loaded: Loaded | None = load_data(Path(data_path), _shape_now(task, data_path))
    elif cfg.data_dir and simulated is not False:
        folder = site_data_folder(cfg.data_dir, site_index)
        if not folder.is_dir():
            raise DataError(
                f"{folder}: no data folder for site {site_index} in data-dir; "
                f"create site-0 .. site-{cfg.sites - 1} there",
                path=folder,
            )
        loaded = load_data(folder, _shape_now(task, folder))
    else:
        loaded = find_site_data(site_dir, lambda: tuple(task.input_shape()))
    if loaded is not None:
        check = getattr(task, "check", None)
        if callable(check):
            check(loaded.records)
    return loaded


def _shape_now(task: Any, path: Path | str) -> tuple[int, ...] | None:
    """The model's input shape, unless the data is tabular (then not needed)."""
    p = Path(path)
    if p.suffix.lower() == ".csv" or (p / "data.csv").is_file():
        return None
    return tuple(task.input_shape())
