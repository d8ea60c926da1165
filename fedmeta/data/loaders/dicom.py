"""DICOM images through pydicom (optional extra: ``pip install 'fedmeta[dicom]'``).

Pixel data is rescaled with the file's RescaleSlope/RescaleIntercept, then
min-max normalised per image to [0, 1] (MONOCHROME1 is inverted so that bright
means dense everywhere). Only the pixels are read: no header field (names,
dates, ids) enters the records.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedmeta.data.loaders.common import DataError


def read_dicom(path: Path, where: str) -> np.ndarray:
    """A DICOM file's first frame as float32 [H, W] (or [H, W, 3]) in [0, 1]."""
    try:
        import pydicom
    except ImportError:
        raise DataError(
            f"{where}: reading DICOM needs pydicom; install the extra "
            "`pip install 'fedmeta[dicom]'`",
            path=path,
        ) from None
    try:
        ds = pydicom.dcmread(path)
        arr = np.asarray(ds.pixel_array, dtype=np.float64)
    except Exception as exc:  # pydicom raises many types for a malformed file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"{where}: not a readable DICOM image ({first}); replace or remove the file", path=path
        ) from None
    samples = int(getattr(ds, "SamplesPerPixel", 1))
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[0]
    if samples == 1 and arr.ndim != 2:
        raise DataError(f"{where}: DICOM pixel data of shape {arr.shape} is not one image")
    arr = arr * float(getattr(ds, "RescaleSlope", 1) or 1) + float(
        getattr(ds, "RescaleIntercept", 0) or 0
    )
    lo, hi = float(arr.min()), float(arr.max())
    out = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32)
