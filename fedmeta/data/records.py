"""A site's records: the arrays a node trains on, which never leave the node."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Records:
    """One site's training records.

    ``x`` holds features (float32, first axis = records), ``y`` holds labels
    (int64 class ids for classification, float32 targets for regression).
    ``groups`` says which episode pool a record belongs to (a class for
    ``digits-fewshot``, a sinusoid for ``sine``, one group for tabular data).
    ``record_ids`` are pseudonymous ids, ``meta`` optional per-record metadata
    columns (consent, age, dates ...) read by the policies, never by the trainer.
    ``units`` names the privacy unit of each record (a patient, a subject, the
    original image of an augmented record); ``None`` means each record is its
    own unit.
    """

    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    record_ids: np.ndarray
    meta: dict[str, np.ndarray] = field(default_factory=dict)
    units: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.x)
        for name in ("y", "groups", "record_ids"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Records.{name} has {len(getattr(self, name))} rows, x has {n}")
        if self.units is not None and len(self.units) != n:
            raise ValueError(f"Records.units has {len(self.units)} rows, x has {n}")
        for name, col in self.meta.items():
            if len(col) != n:
                raise ValueError(f"Records.meta[{name!r}] has {len(col)} rows, x has {n}")

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, mask_or_index: np.ndarray) -> Records:
        """The records selected by a boolean mask or an index array."""
        return Records(
            x=self.x[mask_or_index],
            y=self.y[mask_or_index],
            groups=self.groups[mask_or_index],
            record_ids=self.record_ids[mask_or_index],
            meta={k: v[mask_or_index] for k, v in self.meta.items()},
            units=None if self.units is None else self.units[mask_or_index],
        )
