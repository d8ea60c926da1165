"""An image folder: one sub-folder per class, PNG/JPEG (and DICOM with ``fedmeta[dicom]``).

::

    site-data/
      benign/    img-001.png  img-002.jpg ...
      malignant/ img-101.png ...
      records.csv          (optional policy columns and privacy units, see .common)

Class names are the sub-folder names (sorted: class id 0 is the first). Every
image is converted to the model's channels and resized to its input size. An
unlabelled folder (``labelled=False``, for ``fedmeta predict``) may hold its
images directly or in sub-folders, whose names are then ignored. Hidden files
and files of other types are skipped; an image that cannot be decoded is an
error naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedmeta.data.loaders.common import DataError, Loaded, labels_from_names, read_sidecar
from fedmeta.data.loaders.images import IMAGE_SUFFIXES, check_shape, read_image
from fedmeta.data.records import Records

SIDECAR = "records.csv"


def _images(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def is_imagefolder(path: Path) -> bool:
    return Path(path).is_dir() and bool(_images(Path(path)))


def load_imagefolder(root: Path | str, shape: tuple[int, ...], *, labelled: bool = True) -> Loaded:
    """Read an image folder as records shaped for a model with input ``shape`` (C, H, W)."""
    root = Path(root)
    check_shape(shape)
    if not root.is_dir():
        raise DataError(
            f"{root}: not a folder; give the folder holding one sub-folder per class", path=root
        )
    files = _images(root)
    if not files:
        raise DataError(
            f"{root}: no PNG/JPEG/DICOM images found; put each class's images "
            "in a sub-folder named after the class",
            path=root,
        )
    names: list[str] = []
    if labelled:
        loose = [f for f in files if f.parent == root]
        if loose:
            raise DataError(
                f"{root / loose[0].name}: an image directly in the folder has no "
                "class; move it into its class's sub-folder",
                path=loose[0],
            )
        names = [f.relative_to(root).parts[0] for f in files]
        if len(set(names)) < 2:
            raise DataError(
                f"{root}: found images of {len(set(names))} class; labelled data "
                "needs at least two class sub-folders",
                path=root,
            )
    x = np.stack([read_image(f, shape, root) for f in files])
    ids = np.array([f.relative_to(root).as_posix() for f in files], dtype=str)
    if labelled:
        y, classes = labels_from_names(names)
    else:
        y, classes = np.zeros(len(files), dtype=np.int64), ()
    meta, units = read_sidecar(root / SIDECAR, ids)
    records = Records(x=x, y=y, groups=y.copy(), record_ids=ids, meta=meta, units=units)
    return Loaded(
        records,
        classes,
        {"loader": "imagefolder", "shape": list(shape), "pixels": "[0, 1], resized bilinearly"},
    )
