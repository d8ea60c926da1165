"""Load an institution's own tabular data from a CSV file described by a TOML schema.

This is how a node trains on its own records: ``load_csv`` reads the CSV named
by the node config, keeps only the columns the schema names (data
minimisation), and returns :class:`~fedmeta.data.records.Records` plus a
:class:`LoadReport` saying what was read, ignored and dropped. Every problem
is a :class:`DataError` (a ``ValueError``) with a one-line message naming the
file, line and column and saying what to do.

Schema file (``schema.toml``)
-----------------------------
::

    [dataset]
    name = "my-hospital-cohort"
    task = "classification"        # or "regression"
    label = "diagnosis"            # the label column
    features = ["age_band", "bmi", "glucose"]   # the ONLY columns the trainer reads
    # optional:
    classes = ["benign", "malignant"]  # label values -> class ids 0, 1, ... in this order
    group = "ward"                 # column whose values define episode groups
    unit_column = "patient_id"     # the privacy unit: rows with one value are protected
                                   # together (sampled together, clipped as one)
    delimiter = ","                # one character: "," ";" "\\t" "|" ...
    missing = "error"              # or "drop-row"

    [columns]                      # optional, pseudonymous metadata for the policy engine
    record_id = "pid"              # unique per row; else ids are generated as "row-<n>"
    consent_purposes = "consent"   # purpose ids separated by ";"
    age = "age"                    # years (0-150), or empty
    guardian_consent = "guardian_ok"    # yes/no, or empty (= no)
    # ... and any other column of fedmeta.data.record_columns (the one vocabulary of
    # per-record metadata, shared with image/npz sidecars and records-meta.csv):
    # consent_withdrawn_at, minor, collected_at, erasure_requested, objected_at,
    # restricted_at, opted_out_at

Required keys are ``name``, ``task``, ``label`` and ``features``; unknown keys
are errors. ``features`` must be non-empty and must not contain the label.
The ``record_id`` column may not be a feature or the group.

Reading rules
-------------
* The file is UTF-8 (a byte-order mark is skipped), with LF, CRLF or CR line
  endings, standard CSV quoting, and a header line naming the columns (names
  are compared after stripping surrounding spaces; duplicates are errors).
  Blank lines are skipped and counted in ``LoadReport.blank_lines``.
* Every row has exactly as many fields as the header.
* Features are decimal numbers (``12``, ``-0.5``, ``1e-3``); ``nan``/``inf``,
  non-numbers and values beyond float32 range are errors. For
  ``task = "regression"`` the label follows the same rules.
* Classification labels are looked up in ``classes`` when given; otherwise
  they must be integers ``0 .. C-1`` (C at most ``MAX_IMPLICIT_CLASSES``).
* An empty feature, label or group cell is an error when ``missing = "error"``;
  with ``missing = "drop-row"`` the row is dropped and counted in
  ``LoadReport.rows_dropped`` under the first empty column's reason. Empty
  metadata cells have a meaning (see above) and never drop a row; malformed
  metadata is always an error, and its raw value is never echoed in messages.
* Columns the schema does not name are never parsed or kept: they are listed
  in ``LoadReport.columns_ignored``.

Result
------
``Records.x`` is float32 ``[n, len(features)]`` in ``features`` order;
``Records.y`` is int64 class ids or float32 targets; ``Records.groups`` are
int64 ids of the sorted distinct group values (``LoadReport.group_names``),
all 0 without a group column; ``Records.record_ids`` a str array;
``Records.units`` int64 ids of the sorted distinct unit values when
``unit_column`` is declared (the values themselves are not kept), else None.
An empty unit cell is an error: every row must name its unit.
``Records.meta`` holds, for each declared metadata column, the array
:func:`fedmeta.data.record_columns.meta_array` makes (purposes as frozensets, dates
as ``datetime64[s]`` in UTC with NaT when empty, ``age`` float64 whole years with nan
when empty, yes/no columns as bool).
"""

from __future__ import annotations

import csv
import math
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from fedmeta.data.record_columns import CellError as _CellError
from fedmeta.data.record_columns import meta_array, parse_cell
from fedmeta.data.records import Records
from fedmeta.data.schema import ColumnsSpec, CsvSchema, DatasetSpec
from policies.validation import describe_error

__all__ = [
    "MAX_IMPLICIT_CLASSES",
    "ColumnsSpec",
    "CsvSchema",
    "DataError",
    "DatasetSpec",
    "LoadReport",
    "load_csv",
    "load_schema",
    "parse_schema",
]

MAX_IMPLICIT_CLASSES = 1000
"""Largest class count accepted for integer labels without a ``classes`` list."""

_MAX_SCHEMA_BYTES = 1 << 20
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INTEGER = re.compile(r"[+-]?[0-9]+")
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8 (surrogateescape)
_LINE_BREAK_CHARS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_ONE_LINE = str.maketrans({c: repr(c)[1:-1] for c in _LINE_BREAK_CHARS})


class DataError(ValueError):
    """A problem with a data or schema file, explained in one line.

    ``path``, ``line`` (1-based) and ``column`` are set when known.
    """

    def __init__(
        self,
        message: str,
        *,
        path: Path | None = None,
        line: int | None = None,
        column: str | None = None,
    ) -> None:
        super().__init__(message.translate(_ONE_LINE))
        self.path = path
        self.line = line
        self.column = column


@dataclass(frozen=True)
class LoadReport:
    """What ``load_csv`` read, ignored and dropped.

    Holds counts and column names, plus the class names and the group column's
    distinct values (``group_names``); no record values.
    """

    source: str
    rows_read: int
    rows_used: int
    rows_dropped: dict[str, int] = field(default_factory=dict)
    columns_read: tuple[str, ...] = ()
    columns_ignored: tuple[str, ...] = ()
    blank_lines: int = 0
    class_names: tuple[str, ...] = ()
    group_names: tuple[str, ...] = ()

    @property
    def n_dropped(self) -> int:
        """Total rows dropped (each row counted once, under its first reason)."""
        return sum(self.rows_dropped.values())


# ---------------------------------------------------------------- schema


def _toml_key_line(text: str, table: str | None, key: str | None) -> int | None:
    """1-based line of ``key = ...`` in ``[table]`` (top level if None), or of ``[table]``."""
    current: str | None = None
    key_re = None if key is None else re.compile(rf'\s*(?:{re.escape(key)}|"{re.escape(key)}")\s*=')
    for n, line in enumerate(text.splitlines(), start=1):
        m = re.match(r"\s*\[\s*([^\[\]]+?)\s*\]", line)
        if m:
            current = m.group(1).strip('"')
            if key_re is None and current == table:
                return n
            continue
        if key_re is not None and current == table and key_re.match(line):
            return n
    return None


def _describe_validation_error(err: ValidationError, text: str) -> list[str]:
    """One part per problem: the TOML line, ``[table].key`` and what to do (the wording
    of :func:`policies.validation.describe_error`, shared by every file fedmeta reads)."""
    parts: list[str] = []
    for e in err.errors(include_url=False):
        loc = [str(p) for p in e["loc"]]
        table = loc[0] if loc else None
        key = loc[1] if len(loc) > 1 else None
        where = ""
        if table is not None and key is not None:
            where = f"[{table}].{key}" + "".join(f"[{p}]" for p in loc[2:])
            line = _toml_key_line(text, table, key)
        elif table is not None:
            where = f"[{table}]"
            line = _toml_key_line(text, None, table) or _toml_key_line(text, table, None)
        else:
            line = None
        kind = e["type"]
        if kind == "missing":
            part = (
                f"required key {where} is missing" if key else f"required table {where} is missing"
            )
        elif kind == "extra_forbidden":
            if key is None:
                part = f"unknown table or key {table!r} (allowed: [dataset], [columns])"
            else:
                model = DatasetSpec if table == "dataset" else ColumnsSpec
                allowed = ", ".join(model.model_fields)
                part = f"unknown key {where} (allowed in [{table}]: {allowed})"
        else:
            _, what = describe_error(e)
            part = f"{where}: {what}" if where else what
        if line is not None:
            part = f"line {line}: {part}"
        parts.append(part)
    return parts


def parse_schema(text: str, source: str = "schema.toml") -> CsvSchema:
    """Parse and validate schema TOML text; ``source`` names it in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DataError(
            f"{source}: not valid TOML: {e}; fix the syntax at that line",
        ) from None
    except RecursionError:
        raise DataError(f"{source}: not valid TOML: nested too deeply; fix the file") from None
    try:
        return CsvSchema.model_validate(data)
    except ValidationError as e:
        parts = _describe_validation_error(e, text)
        raise DataError(
            f"{source}: invalid schema: {'; '.join(parts)}; fix {source} "
            "(format: see fedmeta.data.csv_loader)"
        ) from None


def load_schema(path: Path | str) -> CsvSchema:
    """Read and validate a ``schema.toml`` file (format in this module's docstring)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(
            f"{path.name}: cannot read schema file ({e.strerror or type(e).__name__}); "
            "check the path and permissions",
            path=path,
        ) from None
    if len(raw) > _MAX_SCHEMA_BYTES:
        raise DataError(
            f"{path.name}: schema file is larger than {_MAX_SCHEMA_BYTES} bytes; "
            "is this the right file?",
            path=path,
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path.name} line {line}: schema is not valid UTF-8; save it as UTF-8",
            path=path,
            line=line,
        ) from None
    try:
        return parse_schema(text, source=path.name)
    except DataError as e:
        raise DataError(str(e), path=path) from None


# ---------------------------------------------------------------- cell parsers
# A parser takes the stripped cell and returns a value, or raises _CellError whose
# message describes the problem without the raw value where it must not be echoed.
# The metadata cells are parsed by fedmeta.data.record_columns (one vocabulary).


def _short(cell: str) -> str:
    return repr(cell if len(cell) <= 24 else cell[:21] + "...")


def _parse_number(cell: str, *, echo: bool) -> float:
    shown = _short(cell) if echo else "value"
    if not _NUMBER.fullmatch(cell):
        try:
            v = float(cell)
        except ValueError:
            v = 0.0
        if not math.isfinite(v):
            raise _CellError(f"{shown} is not a finite number", "replace it with a number")
        raise _CellError(f"{shown} is not a number", "write a decimal number such as 12 or 0.5")
    v = float(cell)
    if not math.isfinite(v) or abs(v) > _FLOAT32_MAX:
        raise _CellError(f"{shown} is too large for float32", "rescale the column")
    return v


# ---------------------------------------------------------------- the loader


class _Rows:
    """Iterate (1-based start line, row); ``start`` is the line of the row being read."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader
        self.start = 1

    def __iter__(self) -> Iterator[tuple[int, list[str]]]:
        return self

    def __next__(self) -> tuple[int, list[str]]:
        self.start = self.reader.line_num + 1
        return self.start, next(self.reader)


def load_csv(csv_path: Path | str, schema: CsvSchema | Path | str) -> tuple[Records, LoadReport]:
    """Read ``csv_path`` as described by ``schema`` (a model or a schema file path).

    Returns the records and a report of rows read/dropped and columns read/ignored.
    Raises :class:`DataError` for every problem with either file.
    """
    csv_path = Path(csv_path)
    if isinstance(schema, CsvSchema):
        schema_name = "the schema"
    else:
        schema_name = Path(schema).name
        schema = load_schema(schema)
    try:
        # surrogateescape: undecodable bytes become lone surrogates, reported with their line.
        f = open(csv_path, encoding="utf-8-sig", errors="surrogateescape", newline="")  # noqa: SIM115
    except OSError as e:
        raise DataError(
            f"{csv_path.name}: cannot open data file ({e.strerror or type(e).__name__}); "
            "check the path and permissions",
            path=csv_path,
        ) from None
    with f:
        rows = _Rows(csv.reader(f, delimiter=schema.dataset.delimiter, strict=True))
        try:
            return _load(csv_path, schema, schema_name, rows)
        except csv.Error as e:
            line = rows.start
            problem = (
                "a quoted field in the row that starts on this line is never closed"
                if "unexpected end of data" in str(e)
                else f"malformed CSV ({e})"
            )
            raise DataError(
                f"{csv_path.name} line {line}: {problem}; check the quoting (a field with "
                "the delimiter, a quote or a line break must be in double quotes, with "
                'quotes inside doubled as "")',
                path=csv_path,
                line=line,
            ) from None
        except OSError as e:
            raise DataError(
                f"{csv_path.name}: cannot read data file ({e.strerror or type(e).__name__}); "
                "check the file",
                path=csv_path,
            ) from None


def _is_blank(row: list[str]) -> bool:
    return not row or (len(row) == 1 and not row[0].strip())


def _load(
    path: Path, schema: CsvSchema, schema_name: str, rows: _Rows
) -> tuple[Records, LoadReport]:
    name = path.name
    ds = schema.dataset
    drop = ds.missing == "drop-row"
    blank_lines = 0

    def err(msg: str, line: int | None = None, column: str | None = None) -> DataError:
        where = name if line is None else f"{name} line {line}"
        if column is not None:
            where += f", column {column!r}"
        return DataError(f"{where}: {msg}", path=path, line=line, column=column)

    header: list[str] | None = None
    header_line = 1
    for line, row in rows:
        if _is_blank(row):
            blank_lines += 1
            continue
        header, header_line = row, line
        break
    if header is None:
        raise err("file is empty; it needs a header line and at least one data row")
    if any(_UNDECODABLE.search(c) for c in header):
        raise err("header is not valid UTF-8 text; save the file as UTF-8", header_line)
    names = [h.strip() for h in header]
    if all(not n or _NUMBER.fullmatch(n) for n in names):
        raise err(
            "the first line looks like data, not a header; add a header line naming the columns",
            header_line,
        )
    first_pos: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in first_pos:
            raise err(
                f"header names column {first_pos[n] + 1} and column {i + 1} both {n!r}; "
                "give every column a distinct name",
                header_line,
            )
        first_pos[n] = i
    wanted = schema.columns_read
    absent = [c for c in wanted if c not in first_pos]
    if absent:
        raise err(
            f"header lacks column(s) {', '.join(map(repr, absent))} named in {schema_name}; "
            f"add them to the file or fix {schema_name}",
            header_line,
        )
    ncols = len(names)
    columns_ignored = tuple(n for n in names if n not in set(wanted))

    feat_idx = [first_pos[c] for c in ds.features]
    label_idx = first_pos[ds.label]
    group_idx = first_pos[ds.group] if ds.group is not None else None
    unit_idx = first_pos[ds.unit_column] if ds.unit_column is not None else None
    declared = schema.columns.declared()
    rid_col = declared.pop("record_id", None)
    rid_idx = first_pos[rid_col] if rid_col is not None else None
    meta_idx = {role: (col, first_pos[col]) for role, col in declared.items()}
    class_ids = {c: i for i, c in enumerate(ds.classes)} if ds.classes is not None else None
    classification = ds.task == "classification"
    missing_fix = f'fill it in or set missing = "drop-row" in {schema_name}'
    empty_fix = (
        "empty the cell to drop the row"
        if drop
        else f'empty the cell and set missing = "drop-row" in {schema_name}'
    )

    xs: list[list[float]] = []
    ys: list[float | int] = []
    group_values: list[str] = []
    unit_values: list[str] = []
    rids: list[str] = []
    meta_values: dict[str, list[Any]] = {role: [] for role in meta_idx}
    seen_ids: dict[str, int] = {}
    dropped: dict[str, int] = {}
    rows_read = 0

    for line, row in rows:
        if _is_blank(row):
            blank_lines += 1
            continue
        rows_read += 1
        if len(row) != ncols:
            raise err(
                f"row has {len(row)} fields but the header has {ncols}; fix the row "
                "(quote fields that contain the delimiter)",
                line,
            )
        for i, c in enumerate(row):
            if _UNDECODABLE.search(c):
                raise err("value is not valid UTF-8 text; save the file as UTF-8", line, names[i])

        # Metadata first: it is validated even on rows that are then dropped.
        if rid_idx is not None:
            rid = row[rid_idx].strip()
            if not rid:
                raise err("record id is empty; every row needs a unique id", line, rid_col)
            if rid in seen_ids:
                raise err(
                    f"record id duplicates the one on line {seen_ids[rid]}; "
                    "record ids must be unique",
                    line,
                    rid_col,
                )
            seen_ids[rid] = line
        else:
            rid = f"row-{rows_read}"
        unit = ""
        if unit_idx is not None:
            unit = row[unit_idx].strip()
            if not unit:
                raise err(
                    "privacy unit id is empty; every row must name its unit "
                    f"(the {ds.unit_column!r} column)",
                    line,
                    ds.unit_column,
                )
        meta_row: dict[str, Any] = {}
        for role, (col, idx) in meta_idx.items():
            try:
                meta_row[role] = parse_cell(role, row[idx].strip())
            except _CellError as e:
                raise err(f"{e.problem}; {e.fix}", line, col) from None

        reason: str | None = None
        feats: list[float] = []
        for col, idx in zip(ds.features, feat_idx, strict=True):
            cell = row[idx].strip()
            if not cell:
                if drop:
                    reason = f"missing value in {col!r}"
                    break
                raise err(f"value is empty; {missing_fix}", line, col)
            try:
                feats.append(_parse_number(cell, echo=True))
            except _CellError as e:
                raise err(f"{e.problem}; {e.fix}, or {empty_fix}", line, col) from None

        label: float | int = 0
        if reason is None:
            cell = row[label_idx].strip()
            if not cell:
                if not drop:
                    raise err(f"label is empty; {missing_fix}", line, ds.label)
                reason = f"missing value in {ds.label!r}"
            elif not classification:
                try:
                    label = _parse_number(cell, echo=True)
                except _CellError as e:
                    raise err(f"label {e.problem}; {e.fix}", line, ds.label) from None
            elif class_ids is not None:
                if cell not in class_ids:
                    raise err(
                        f"label {_short(cell)} is not one of classes "
                        f"{list(class_ids)}; fix the value or add it to classes in "
                        f"{schema_name}",
                        line,
                        ds.label,
                    )
                label = class_ids[cell]
            else:
                if not _INTEGER.fullmatch(cell):
                    raise err(
                        f"label {_short(cell)} is not an integer class id; write 0..C-1 or "
                        f"declare classes = [...] in {schema_name}",
                        line,
                        ds.label,
                    )
                # (length first: int() refuses strings of more than 4300 digits)
                label = int(cell) if len(cell) <= 12 else -1
                if not 0 <= label < MAX_IMPLICIT_CLASSES:
                    raise err(
                        f"label {_short(cell)} is out of range 0..{MAX_IMPLICIT_CLASSES - 1}; "
                        f"fix the value or declare classes = [...] in {schema_name}",
                        line,
                        ds.label,
                    )

        group = ""
        if reason is None and group_idx is not None:
            group = row[group_idx].strip()
            if not group:
                if not drop:
                    raise err(f"group is empty; {missing_fix}", line, ds.group)
                reason = f"missing value in {ds.group!r}"

        if reason is not None:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        xs.append(feats)
        ys.append(label)
        group_values.append(group)
        unit_values.append(unit)
        rids.append(rid)
        for role, v in meta_row.items():
            meta_values[role].append(v)

    if not xs:
        if rows_read == 0:
            raise err("has a header but no data rows; add records to the file")
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(dropped.items()))
        raise err(
            f"no usable rows: all {rows_read} rows were dropped ({reasons}); "
            "fill in the missing values"
        )

    n = len(xs)
    x = np.array(xs, dtype=np.float32).reshape(n, len(ds.features))
    y = np.array(ys, dtype=np.int64 if classification else np.float32)
    if group_idx is not None:
        group_names, inverse = np.unique(np.array(group_values, dtype=str), return_inverse=True)
        groups = inverse.astype(np.int64).reshape(n)
        group_tuple = tuple(str(g) for g in group_names)
    else:
        groups = np.zeros(n, dtype=np.int64)
        group_tuple = ()
    records = Records(
        x=x,
        y=y,
        groups=groups,
        record_ids=np.array(rids, dtype=str),
        meta={role: meta_array(role, vals) for role, vals in meta_values.items()},
        units=(
            np.unique(np.array(unit_values, dtype=str), return_inverse=True)[1]
            .astype(np.int64)
            .reshape(n)
            if unit_idx is not None
            else None
        ),
    )
    report = LoadReport(
        source=name,
        rows_read=rows_read,
        rows_used=n,
        rows_dropped=dict(sorted(dropped.items())),
        columns_read=wanted,
        columns_ignored=columns_ignored,
        blank_lines=blank_lines,
        class_names=tuple(ds.classes) if ds.classes is not None else (),
        group_names=group_tuple,
    )
    return records, report
