"""Validation of a site's reply before it may touch the global model.

A reply is accepted only if it carries exactly the expected arrays (same keys,
shapes and dtypes as theta), every value is finite, and the update's L2 norm
||phi - theta|| stays under a bound. Anything else is dropped with a reason.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def model_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over names, shapes, dtypes and bytes of a model's arrays (audit receipts)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def check_update(
    theta: Mapping[str, np.ndarray], phi: Mapping[str, np.ndarray], max_norm: float
) -> str | None:
    """None if ``phi`` is an acceptable reply to ``theta``, else a one-line reason."""
    missing = sorted(set(theta) - set(phi))
    extra = sorted(set(phi) - set(theta))
    if missing or extra:
        return f"array keys differ from the model (missing {missing[:3]}, unexpected {extra[:3]})"
    sq = 0.0
    for name, ref in theta.items():
        arr = phi[name]
        if arr.shape != ref.shape:
            return f"array {name!r} has shape {arr.shape}, expected {ref.shape}"
        if arr.dtype != ref.dtype:
            return f"array {name!r} has dtype {arr.dtype}, expected {ref.dtype}"
        if not np.isfinite(arr).all():
            return f"array {name!r} holds non-finite values"
        sq += float(np.sum((arr.astype(np.float64) - ref.astype(np.float64)) ** 2))
    norm = sq**0.5
    if norm > max_norm:
        return f"update norm {norm:.3g} exceeds the bound {max_norm:g}"
    return None
