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
other columns are those of a CSV schema's ``[columns]`` table, with the same
meanings. Every problem is a one-line :class:`DataError` naming file and line.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmeta.data.csv_loader import _META_PARSERS, DataError, _CellError, _meta_array
from fedmeta.data.records import Records

__all__ = ["DataError", "Loaded", "read_sidecar", "SIDECAR_COLUMNS"]

SIDECAR_COLUMNS = ("record_id", "unit", *_META_PARSERS)


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


def read_sidecar(path: Path, record_ids: np.ndarray) -> tuple[dict[str, np.ndarray],
                                                               np.ndarray | None]:
    """(Records.meta, units) from a sidecar CSV; records without a row get empty cells
    (no consent on file, unknown age) and their own unit. Missing file: ({}, None)."""
    if not path.exists():
        return {}, None
    index = {str(r): i for i, r in enumerate(record_ids)}
    n = len(record_ids)
    try:
        fh = open(path, newline="", encoding="utf-8-sig")  # noqa: SIM115
    except OSError as exc:
        raise DataError(f"{path.name}: cannot open ({exc.strerror}); check the file",
                        path=path) from None
    with fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DataError(f"{path.name} line 1: empty file; write a header starting with "
                            "record_id", path=path, line=1) from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataError(f"{path.name} line 1: unreadable ({exc})", path=path,
                            line=1) from None
        unknown = [h for h in header if h not in SIDECAR_COLUMNS]
        if "record_id" not in header or unknown or len(set(header)) != len(header):
            raise DataError(
                f"{path.name} line 1: the header needs record_id, may name "
                f"{', '.join(SIDECAR_COLUMNS[1:])} once each (unknown: {unknown})",
                path=path, line=1)
        roles = [h for h in header if h in _META_PARSERS]
        values: dict[str, list[Any]] = {r: [_META_PARSERS[r]("")] * n for r in roles}
        units: list[str] | None = None if "unit" not in header else [""] * n
        seen: set[str] = set()
        line = 1
        try:
            for line, row in enumerate(reader, start=2):
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path.name} line {line}: {len(row)} fields, the header "
                                    f"has {len(header)}", path=path, line=line)
                cells = dict(zip(header, (c.strip() for c in row), strict=True))
                rid = cells["record_id"]
                if rid not in index:
                    raise DataError(f"{path.name} line {line}, column 'record_id': not a "
                                    "record of this data set (ids are file paths relative "
                                    "to the folder, or <split>-<index>)", path=path, line=line)
                if rid in seen:
                    raise DataError(f"{path.name} line {line}, column 'record_id': duplicate "
                                    "record id", path=path, line=line)
                seen.add(rid)
                i = index[rid]
                if units is not None:
                    units[i] = cells["unit"]
                for role in roles:
                    try:
                        values[role][i] = _META_PARSERS[role](cells[role])
                    except _CellError as exc:
                        raise DataError(f"{path.name} line {line}, column {role!r}: "
                                        f"{exc.problem}; {exc.fix}", path=path,
                                        line=line) from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataError(f"{path.name} line {line + 1}: unreadable ({exc})", path=path,
                            line=line + 1) from None
    meta = {role: _meta_array(role, vals) for role, vals in values.items()}
    unit_arr = None
    if units is not None:
        # a record without a unit is its own unit
        unit_arr = np.array([u or f"record:{record_ids[i]}" for i, u in enumerate(units)],
                            dtype=str)
    return meta, unit_arr


def labels_from_names(names: list[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Class names per record -> (int64 ids in sorted-name order, class names)."""
    classes = tuple(sorted(set(names)))
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup[n] for n in names], dtype=np.int64), classes
