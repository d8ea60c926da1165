"""Loaders for the data hospitals hold, read where the site keeps it.

* ``load_tabular``   : ``data.csv`` + ``schema.toml`` (optional per-site standardisation)
* ``load_imagefolder``: one sub-folder per class, PNG/JPEG (DICOM with ``fedmeta[dicom]``)
* ``load_npz``       : MedMNIST-layout ``.npz`` (``train_images``, ``train_labels``, ...)

``load_data`` picks the loader from what is at a path; ``find_site_data`` is what
a site uses: its data folder (the node config's ``data``, the run's
``data-dir/site-<i>`` in a simulation, else its own directory) holding
``data.csv`` + ``schema.toml``, ``data.npz``, or an ``images/`` folder. Every
loader returns :class:`~fedmeta.data.loaders.common.Loaded`; every problem is a
one-line :class:`~fedmeta.data.csv_loader.DataError` naming the file and line
or entry.
"""

from __future__ import annotations

from pathlib import Path

from fedmeta.data.loaders.common import DataError, Loaded
from fedmeta.data.loaders.imagefolder import is_imagefolder, load_imagefolder
from fedmeta.data.loaders.npz import load_npz
from fedmeta.data.loaders.tabular import DATA_FILE, SCHEMA_FILE, load_tabular, read_features

__all__ = [
    "DataError",
    "Loaded",
    "find_site_data",
    "load_data",
    "load_imagefolder",
    "load_npz",
    "load_tabular",
    "read_features",
]

NPZ_FILE = "data.npz"
IMAGES_DIR = "images"


def load_data(
    path: Path | str, shape: tuple[int, ...] | None, *, labelled: bool = True, split: str = "train"
) -> Loaded:
    """Records from whatever is at ``path`` (see the module docstring); ``shape`` is the
    model's input shape, which images are resized to."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; check the path", path=path)
    if path.is_file() and path.suffix.lower() == ".npz":
        return load_npz(path, _image_shape(shape, path), split=split, labelled=labelled)
    if path.is_file() and path.suffix.lower() == ".csv" or (path / DATA_FILE).is_file():
        return load_tabular(path)
    if path.is_dir() and (path / NPZ_FILE).is_file():
        return load_npz(path / NPZ_FILE, _image_shape(shape, path), split=split, labelled=labelled)
    if path.is_dir() and is_imagefolder(path / IMAGES_DIR):
        return load_imagefolder(path / IMAGES_DIR, _image_shape(shape, path), labelled=labelled)
    if is_imagefolder(path):
        return load_imagefolder(path, _image_shape(shape, path), labelled=labelled)
    raise DataError(
        f"{path}: no data found; expected {DATA_FILE} + {SCHEMA_FILE}, an .npz "
        "file, or an image folder (one sub-folder per class)",
        path=path,
    )


def _image_shape(shape: tuple[int, ...] | None, path: Path) -> tuple[int, ...]:
    if shape is None:
        raise DataError(f"{path}: image data needs the model's input shape")
    return tuple(shape)


def find_site_data(path: Path | str, shape_of: object) -> Loaded | None:
    """A site's data at ``path`` by the conventional names, or None if there is none
    (a simulated site on a bundled task). ``shape_of`` is a callable giving the model's
    input shape, called only for image data."""
    path = Path(path)
    if not path.exists():
        return None
    conventional = (
        path.is_file()
        or (path / DATA_FILE).is_file()
        or (path / NPZ_FILE).is_file()
        or is_imagefolder(path / IMAGES_DIR)
    )
    if not conventional:
        return None
    tabular = path.suffix.lower() == ".csv" or (path / DATA_FILE).is_file()
    shape = None if tabular or not callable(shape_of) else tuple(shape_of())
    return load_data(path, shape)
