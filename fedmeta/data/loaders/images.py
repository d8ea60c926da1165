"""One image -> one model input: float32 ``[C, H, W]`` in [0, 1], resized to the model's.

Pillow decodes PNG and JPEG (8- or 16-bit, grayscale, RGB, palette); a DICOM file
is decoded by ``fedmeta.data.loaders.dicom`` (optional extra ``fedmeta[dicom]``).
Grayscale input for an RGB model is repeated over the three channels; RGB input
for a grayscale model is converted with ITU-R 601-2 luma (Pillow's ``L``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedmeta.data.loaders.common import DataError

PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = PILLOW_SUFFIXES + DICOM_SUFFIXES


def check_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The model's input as (channels, height, width); 1 or 3 channels."""
    if len(shape) != 3 or shape[0] not in (1, 3) or min(shape) < 1:
        raise DataError(
            f"the model's input shape {tuple(shape)} is not an image shape "
            "(channels 1 or 3, height, width); use a tabular loader"
        )
    return int(shape[0]), int(shape[1]), int(shape[2])


def from_array(arr: np.ndarray, shape: tuple[int, ...], where: str) -> np.ndarray:
    """An image array ([H, W], [H, W, 1|3|4]; uint8, uint16 or float in [0, 1]) -> input."""
    from PIL import Image

    c, h, w = check_shape(shape)
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[-1] in (1, 3, 4):
        a = a[..., :3] if a.shape[-1] != 1 else a[..., 0]
    if a.ndim not in (2, 3) or min(a.shape[:2]) < 1:
        raise DataError(
            f"{where}: an image must be [H, W] or [H, W, 3], got shape "
            f"{tuple(np.asarray(arr).shape)}"
        )
    if a.dtype == np.uint8:
        f = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        f = a.astype(np.float32) / 65535.0
    elif np.issubdtype(a.dtype, np.floating):
        f = a.astype(np.float32)
        if not np.isfinite(f).all() or f.min() < 0.0 or f.max() > 1.0:
            raise DataError(f"{where}: float pixel values must be finite and in [0, 1]")
    else:
        raise DataError(
            f"{where}: pixel type {a.dtype} not supported (uint8, uint16 or float in [0, 1])"
        )
    if f.ndim == 3 and c == 1:
        f = f @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    planes = [f] if f.ndim == 2 else [f[..., k] for k in range(3)]
    if (h, w) != planes[0].shape:
        planes = [
            np.asarray(Image.fromarray(p, mode="F").resize((w, h), Image.Resampling.BILINEAR))
            for p in planes
        ]
    out = np.stack(planes).astype(np.float32)
    if c == 3 and out.shape[0] == 1:
        out = np.repeat(out, 3, axis=0)
    return np.clip(out, 0.0, 1.0)


def read_image(path: Path, shape: tuple[int, ...], root: Path | None = None) -> np.ndarray:
    """Decode one image file to a model input; one-line DataError naming the file."""
    where = str(path.relative_to(root)) if root is not None else str(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        from fedmeta.data.loaders.dicom import read_dicom

        return from_array(read_dicom(path, where), shape, where)
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # pragma: no cover - pillow is a dependency
        raise DataError("image loading needs Pillow (pip install pillow)") from None
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = (
                    np.asarray(img, dtype=np.uint16)
                    if img.mode != "I"
                    else np.clip(np.asarray(img), 0, 65535).astype(np.uint16)
                )
            else:
                arr = np.asarray(img.convert("RGB" if img.mode not in ("L", "1") else "L"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(
            f"{where}: not a readable PNG/JPEG image "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            "replace or remove the file",
            path=path,
        ) from None
    return from_array(arr, shape, where)
