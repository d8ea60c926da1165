"""What every loader shares: the result type, errors, and the policy-columns sidecar.

A loader returns :class:`Loaded`: the site's :class:`~fedmeta.data.records.Records`
(features, labels, pseudonymous record ids, per-record policy metadata, privacy
units), the class names in label order and a JSON-ready description of the
preprocessing, so that a model adapted on these records can be applied to new
ones in exactly the same way (``fedmeta predict``).

Policy columns for images and arrays come from a sidecar CSV (``records.csv``
in an image folder, ``<name>.records.csv`` beside an ``.npz``)::

    record_id,unit,consent_purposes,age,collected_at,erasure_requested
    benign/img-001.png,patient-17,research.model-training,54,2024-02-01,
    benign/img-002.png,patient-17,research.model-training,54,2024-02-01,

``record_id`` is the record's id as the loader names it (an image's path
relative to the folder, ``train-<i>`` for an npz entry); ``unit`` is the
privacy unit (e.g. the patient: all images of one patient are one unit); the
other columns are the per-record metadata columns of
:mod:`fedmeta.data.record_columns` (the same as a CSV schema's ``[columns]``
roles). Every problem is a one-line :class:`DataError` naming file and line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmeta.data.csv_loader import DataError
from fedmeta.data.record_columns import META_COLUMNS, MetaReadError, read_meta_csv
from fedmeta.data.records import Records

__all__ = ["DataError", "Loaded", "read_sidecar", "SIDECAR_COLUMNS"]

SIDECAR_COLUMNS = ("record_id", "unit", *META_COLUMNS)


@dataclass(frozen=True)
class Loaded:
    """A site's records, their class names (label order) and how they were preprocessed."""

    records: Records
    classes: tuple[str, ...]
    preprocessing: dict[str, Any] = field(default_factory=dict)
    read_columns: tuple[str, ...] | None = None

    @property
    def unit_name(self) -> str | None:
        """What one privacy unit is (a CSV's declared unit column, else the sidecar's
        ``unit``); None when every record is its own unit."""
        if self.records.units is None:
            return None
        return str(self.preprocessing.get("unit_column") or "unit")


def read_sidecar(
    path: Path, record_ids: np.ndarray
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """(Records.meta, units) from a sidecar CSV (:func:`fedmeta.data.record_columns.
    read_meta_csv`); records without a row get empty cells (no consent on file, unknown
    age) and their own unit. Missing file: ({}, None)."""
    try:
        return read_meta_csv(path, record_ids, allow_unit=True)
    except MetaReadError as exc:
        raise DataError(str(exc), path=exc.path, line=exc.line) from None


def labels_from_names(names: list[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Class names per record -> (int64 ids in sorted-name order, class names)."""
    classes = tuple(sorted(set(names)))
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup[n] for n in names], dtype=np.int64), classes
