"""A MedMNIST-layout ``.npz``: ``<split>_images`` and ``<split>_labels`` arrays.

``train_images`` is uint8 ``[N, H, W]`` (grayscale) or ``[N, H, W, 3]`` (RGB), or
uint16, or float in [0, 1]; ``train_labels`` holds N integer class ids (``[N]`` or
``[N, 1]``); likewise ``val_`` and ``test_``. The user downloads the file; nothing
is fetched. Optional: ``<split>_units`` (N privacy-unit ids, e.g. patients) and
policy columns in ``<name>.records.csv`` beside the file (record ids
``<split>-<index>``, see .common). Class names are the label values as text.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from fedmeta.data.loaders.common import DataError, Loaded, read_sidecar
from fedmeta.data.loaders.images import check_shape, from_array

SPLITS = ("train", "val", "test")


def load_npz(
    path: Path | str, shape: tuple[int, ...], *, split: str = "train", labelled: bool = True
) -> Loaded:
    """Read one split of an npz file as records for a model with input ``shape``."""
    path = Path(path)
    check_shape(shape)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(
            f"{path.name}: not a readable .npz file ({type(exc).__name__}); "
            "give the MedMNIST-layout file you downloaded",
            path=path,
        ) from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise DataError(f"{path.name}: a single array, not an .npz archive", path=path)
    with data:
        keys = set(data.files)
        img_key = f"{split}_images"
        if img_key not in keys:
            raise DataError(
                f"{path.name}: no array {img_key!r} (arrays: "
                f"{', '.join(sorted(keys)) or 'none'}); choose another split",
                path=path,
            )
        try:
            images = data[img_key]
            labels = data[f"{split}_labels"] if labelled and f"{split}_labels" in keys else None
            units_raw = data[f"{split}_units"] if f"{split}_units" in keys else None
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
            raise DataError(
                f"{path.name}: array of split {split!r} unreadable "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                path=path,
            ) from None
    if labelled and labels is None:
        raise DataError(
            f"{path.name}: no array '{split}_labels'; labelled data needs it", path=path
        )
    if images.ndim not in (3, 4) or len(images) == 0:
        raise DataError(
            f"{path.name}: {img_key} has shape {images.shape}; expected "
            "[N, H, W] or [N, H, W, 3] with N > 0",
            path=path,
        )
    n = len(images)
    x = np.stack(
        [from_array(images[i], shape, f"{path.name} entry {img_key}[{i}]") for i in range(n)]
    )
    classes: tuple[str, ...] = ()
    y = np.zeros(n, dtype=np.int64)
    if labels is not None:
        lab = np.asarray(labels)
        if lab.ndim == 2 and lab.shape[1] == 1:
            lab = lab[:, 0]
        if lab.shape != (n,):
            raise DataError(
                f"{path.name}: {split}_labels has shape {np.asarray(labels).shape}"
                f", expected [{n}] or [{n}, 1] (one class per image; multi-label "
                "sets are not supported)",
                path=path,
            )
        if not np.issubdtype(lab.dtype, np.integer):
            raise DataError(
                f"{path.name}: {split}_labels are {lab.dtype}, not integer class ids", path=path
            )
        bad = np.flatnonzero(lab < 0)
        if len(bad):
            raise DataError(
                f"{path.name} entry {split}_labels[{int(bad[0])}]: negative class id", path=path
            )
        values = np.unique(lab)
        if len(values) < 2:
            raise DataError(
                f"{path.name}: {split}_labels hold one class; labelled data needs at least two",
                path=path,
            )
        y = np.searchsorted(values, lab).astype(np.int64)
        classes = tuple(str(int(v)) for v in values)
    ids = np.array([f"{split}-{i}" for i in range(n)], dtype=str)
    meta, units = read_sidecar(path.with_name(path.stem + ".records.csv"), ids)
    if units_raw is not None:
        if len(units_raw) != n:
            raise DataError(
                f"{path.name}: {split}_units has {len(units_raw)} entries, {img_key} has {n}",
                path=path,
            )
        units = np.asarray(units_raw).astype(str)
    from fedmeta.data.records import Records

    records = Records(x=x, y=y, groups=y.copy(), record_ids=ids, meta=meta, units=units)
    return Loaded(
        records,
        classes,
        {
            "loader": "npz",
            "split": split,
            "shape": list(shape),
            "pixels": "[0, 1], resized bilinearly",
        },
    )
