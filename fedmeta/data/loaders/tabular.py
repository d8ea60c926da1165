"""A site's CSV (``data.csv`` described by ``schema.toml``, format in
``fedmeta.data.csv_loader``), optionally standardised with statistics fitted on the
site's own rows (``standardise = true`` in ``[dataset]``); and the same features read
from an unlabelled CSV for predictions (no label column needed).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmeta.data.csv_loader import (
    CsvSchema,
    DataError,
    _CellError,
    _parse_number,
    load_csv,
    load_schema,
)
from fedmeta.data.loaders.common import Loaded
from fedmeta.data.records import Records

DATA_FILE = "data.csv"
SCHEMA_FILE = "schema.toml"


@dataclass(frozen=True)
class Standardiser:
    """Per-feature mean and standard deviation fitted at one site (std 0 -> 1)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardiser:
        std = x.std(0)
        return cls(x.mean(0).astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32))

    def apply(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    @classmethod
    def from_dict(cls, d: dict[str, list[float]]) -> Standardiser:
        return cls(np.asarray(d["mean"], np.float32), np.asarray(d["std"], np.float32))


def csv_paths(path: Path) -> tuple[Path, Path]:
    """(data.csv, schema.toml) of a folder, or of a CSV file with schema.toml beside it."""
    path = Path(path)
    if path.is_dir():
        return path / DATA_FILE, path / SCHEMA_FILE
    return path, path.with_name(SCHEMA_FILE)


def load_tabular(path: Path | str, schema: CsvSchema | None = None) -> Loaded:
    """A site's labelled CSV as records (standardised per site if the schema says so)."""
    data, schema_path = csv_paths(Path(path))
    if schema is None:
        schema = load_schema(schema_path)
        records, _ = load_csv(data, schema_path)  # errors then name schema.toml
    else:
        records, _ = load_csv(data, schema)
    ds = schema.dataset
    classes = (
        tuple(ds.classes)
        if ds.classes is not None
        else tuple(str(c) for c in range(int(records.y.max()) + 1))
        if ds.task == "classification"
        else ()
    )
    prep: dict = {
        "loader": "csv",
        "features": list(ds.features),
        "delimiter": ds.delimiter,
        "record_id": schema.columns.record_id,
    }
    if ds.unit_column is not None:
        prep["unit_column"] = ds.unit_column
    if ds.standardise:
        scaler = Standardiser.fit(records.x)
        records = Records(
            scaler.apply(records.x),
            records.y,
            records.groups,
            records.record_ids,
            records.meta,
            records.units,
        )
        prep["standardise"] = scaler.to_dict()
    return Loaded(records, classes, prep, read_columns=tuple(ds.features))


def read_features(path: Path | str, prep: dict) -> Records:
    """The features a model was adapted on, from a CSV that may lack the label column.

    ``prep`` is the preprocessing recorded at adaptation: feature names, delimiter,
    record-id column and the standardisation fitted then (applied unchanged)."""
    path = Path(path)
    if path.is_dir():
        path = path / DATA_FILE
    features: list[str] = list(prep["features"])
    try:
        fh = open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115
    except OSError as exc:
        raise DataError(
            f"{path.name}: cannot open data file ({exc.strerror}); check the path", path=path
        ) from None
    rows: list[list[float]] = []
    ids: list[str] = []
    with fh:
        reader = csv.reader(fh, delimiter=prep.get("delimiter", ","))
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DataError(
                f"{path.name}: file is empty; it needs a header line", path=path
            ) from None
        except csv.Error as exc:
            raise DataError(f"{path.name} line 1: malformed CSV ({exc})", path=path) from None
        absent = [f for f in features if f not in header]
        if absent:
            raise DataError(
                f"{path.name} line 1: header lacks feature column(s) "
                f"{', '.join(map(repr, absent))} the model was adapted on",
                path=path,
                line=1,
            )
        idx = [header.index(f) for f in features]
        rid_col = prep.get("record_id")
        rid_idx = header.index(rid_col) if rid_col and rid_col in header else None
        try:
            for row in reader:
                line = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{path.name} line {line}: row has {len(row)} fields but "
                        f"the header has {len(header)}",
                        path=path,
                        line=line,
                    )
                vals = []
                for f, i in zip(features, idx, strict=True):
                    try:
                        vals.append(_parse_number(row[i].strip(), echo=True))
                    except _CellError as exc:
                        raise DataError(
                            f"{path.name} line {line}, column {f!r}: {exc.problem}; {exc.fix}",
                            path=path,
                            line=line,
                        ) from None
                rows.append(vals)
                ids.append(row[rid_idx].strip() if rid_idx is not None else f"row-{len(ids) + 1}")
        except csv.Error as exc:
            raise DataError(
                f"{path.name} line {reader.line_num}: malformed CSV ({exc})", path=path
            ) from None
    if not rows:
        raise DataError(f"{path.name}: has a header but no data rows", path=path)
    x = np.asarray(rows, dtype=np.float32)
    if prep.get("standardise"):
        x = Standardiser.from_dict(prep["standardise"]).apply(x)
    n = len(x)
    zeros = np.zeros(n, dtype=np.int64)
    return Records(x=x, y=zeros, groups=zeros, record_ids=np.array(ids, dtype=str))
