"""Per-record policy metadata: one vocabulary of columns and one reader of their cells.

Every place a site's per-record metadata is read uses this module: the ``[columns]``
table of a CSV schema (:mod:`fedmeta.data.csv_loader`), the sidecar CSV of an image
folder or an ``.npz`` (:mod:`fedmeta.data.loaders.common`) and ``records-meta.csv``
beside a bundled task's site (:mod:`fedmeta.data.record_meta`). The columns are:

=======================  ==========================================================
``consent_purposes``     purpose ids the data subject consented to, ';'-separated
``consent_withdrawn_at`` when consent was withdrawn: ISO date/datetime, or empty
``age``                  age in years (0-150; a fraction is dropped: 17.9 is 17),
                         or empty (unknown)
``minor``                a child although the age is not recorded: yes/no, or empty
``guardian_consent``     a parent or guardian consented: yes/no, or empty (= no)
``collected_at``         when the record was collected: ISO date/datetime, or empty
``erasure_requested``    yes/no, the request's ISO date (= yes), or empty (= no)
``objected_at``          GDPR Art. 21 objection since: ISO date, or empty
``restricted_at``        GDPR Art. 18 restriction in effect since: ISO date, or empty
``opted_out_at``         national opt-out since: ISO date, or empty
=======================  ==========================================================

Yes/no cells accept ``true``/``false``, ``yes``/``no``, ``y``/``n`` and ``1``/``0`` in
any case. Aware datetimes are converted to UTC. A malformed cell is an error whose
message never echoes the raw value (metadata may be personal).

:func:`read_meta_csv` reads a metadata CSV (``record_id`` plus any of these columns,
and ``unit`` where the caller allows one) into the arrays of ``Records.meta``;
:func:`record_metas` turns ``Records.meta`` into the :class:`policies.RecordMeta`
objects the record-level rules read.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from policies import RecordMeta

if TYPE_CHECKING:  # numpy is imported where arrays are built: `fedmeta --help` and the
    import numpy as np  # CLI's start stay free of numpy's threads (see fedmeta.netns)

__all__ = [
    "DATE_COLUMNS",
    "FALSE_WORDS",
    "META_COLUMNS",
    "TRUE_WORDS",
    "CellError",
    "MetaReadError",
    "meta_array",
    "parse_cell",
    "read_meta_csv",
    "record_metas",
]

TRUE_WORDS = frozenset({"true", "yes", "y", "1"})
FALSE_WORDS = frozenset({"false", "no", "n", "0"})
DATE_COLUMNS = (
    "consent_withdrawn_at",
    "collected_at",
    "objected_at",
    "restricted_at",
    "opted_out_at",
)
_RENAMED = {"consented_purposes": "consent_purposes"}
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


class CellError(Exception):
    """One malformed cell: ``problem`` (without the raw value) and ``fix``."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix


class MetaReadError(ValueError):
    """A metadata CSV that cannot be read; one line naming the file, line and column."""

    def __init__(self, message: str, *, path: Path | None = None, line: int | None = None) -> None:
        super().__init__(" ".join(message.split()))
        self.path = path
        self.line = line
        self.column: str | None = None


# ---------------------------------------------------------------- cells


def _yes_no(cell: str) -> bool:
    low = cell.lower()
    if low in TRUE_WORDS:
        return True
    if low in FALSE_WORDS or not cell:
        return False
    raise CellError(
        "value is not a boolean", "write true/false, yes/no, y/n, 1/0 or leave it empty"
    )


def _date(cell: str) -> datetime | None:
    if not cell:
        return None
    try:
        dt = datetime.fromisoformat(cell)
    except (ValueError, OverflowError):
        raise CellError(
            "value is not an ISO date", "write YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS, or leave it empty"
        ) from None
    if dt.tzinfo is not None:
        try:
            dt = dt.astimezone(UTC).replace(tzinfo=None)
        except (ValueError, OverflowError):
            raise CellError("value is an out-of-range date", "fix the date") from None
    return dt


def _erasure(cell: str) -> bool:
    try:
        return _yes_no(cell)
    except CellError:
        pass
    try:
        _date(cell)
    except CellError:
        raise CellError(
            "value is neither a boolean nor an ISO date",
            "write true/false, yes/no, y/n, 1/0, the request date (YYYY-MM-DD) or leave it empty",
        ) from None
    return True


def _age(cell: str) -> float:
    if not cell:
        return math.nan
    if not _NUMBER.fullmatch(cell):
        raise CellError("value is not a number", "write the age in years or leave it empty")
    years = float(cell)
    if not 0 <= years <= 150:
        raise CellError("value is not an age in years (0-150)", "fix the age or leave it empty")
    return float(math.floor(years))  # completed years


def _purposes(cell: str) -> frozenset[str]:
    return frozenset(p.strip() for p in cell.split(";") if p.strip())


_PARSERS: dict[str, Callable[[str], Any]] = {
    "consent_purposes": _purposes,
    "consent_withdrawn_at": _date,
    "age": _age,
    "minor": _yes_no,
    "guardian_consent": _yes_no,
    "collected_at": _date,
    "erasure_requested": _erasure,
    "objected_at": _date,
    "restricted_at": _date,
    "opted_out_at": _date,
}
META_COLUMNS: tuple[str, ...] = tuple(_PARSERS)
"""The per-record metadata columns, in the order documented above."""


def parse_cell(column: str, cell: str) -> Any:
    """The value of one stripped metadata cell (empty: the column's 'unknown'), or
    CellError saying what is wrong and what to write."""
    return _PARSERS[column](cell)


def meta_array(column: str, values: list[Any]) -> np.ndarray:
    """One ``Records.meta`` array from parsed cells: purposes an object array of
    frozensets, dates ``datetime64[s]`` (NaT: empty), ages float64 (nan: unknown),
    yes/no and erasure bool."""
    import numpy as np

    if column == "consent_purposes":
        arr = np.empty(len(values), dtype=object)
        for i, v in enumerate(values):
            arr[i] = v
        return arr
    if column in DATE_COLUMNS:
        return np.array(
            [np.datetime64("NaT", "s") if v is None else np.datetime64(v, "s") for v in values],
            dtype="datetime64[s]",
        )
    if column == "age":
        return np.array(values, dtype=np.float64)
    return np.array(values, dtype=bool)


# ---------------------------------------------------------------- files


def read_meta_csv(
    path: Path, record_ids: np.ndarray, *, allow_unit: bool = True, shown: str | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """(``Records.meta``, units) from a metadata CSV. Records without a row get empty
    cells (no consent on file, unknown age) and, with a ``unit`` column, their own
    unit. A missing file gives ({}, None). ``shown`` is how messages name the file
    (default: its name). Every problem is a one-line :class:`MetaReadError`."""
    import numpy as np

    path = Path(path)
    if not path.exists():
        return {}, None
    name = shown or path.name
    allowed = ("record_id", *(("unit",) if allow_unit else ()), *META_COLUMNS)

    def fail(message: str, line: int | None, column: str | None = None) -> MetaReadError:
        where = f"{name} line {line}" if line is not None else name
        if column is not None:
            where += f", column {column!r}"
        return MetaReadError(f"{where}: {message}", path=path, line=line)

    index = {str(r): i for i, r in enumerate(record_ids)}
    n = len(record_ids)
    try:
        fh = open(path, newline="", encoding="utf-8-sig")  # noqa: SIM115
    except OSError as exc:
        raise fail(f"cannot open ({exc.strerror}); check the file", None) from None
    with fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise fail("empty file; write a header starting with record_id", 1) from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise fail(f"unreadable ({exc}); save it as UTF-8 CSV", 1) from None
        renamed = [h for h in header if h in _RENAMED]
        if renamed:
            raise fail(
                f"column {renamed[0]!r} is called {_RENAMED[renamed[0]]!r}: rename it "
                "in the header",
                1,
            )
        unknown = [h for h in header if h not in allowed]
        if "record_id" not in header or unknown or len(set(header)) != len(header):
            raise fail(
                f"the header needs record_id and may name {', '.join(allowed[1:])} "
                f"once each (unknown: {unknown})",
                1,
            )
        columns = [h for h in header if h in _PARSERS]
        values: dict[str, list[Any]] = {c: [_PARSERS[c]("")] * n for c in columns}
        units: list[str] | None = None if "unit" not in header else [""] * n
        seen: set[str] = set()
        line = 1
        try:
            for line, row in enumerate(reader, start=2):
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != len(header):
                    raise fail(f"{len(row)} fields, the header has {len(header)}", line)
                cells = dict(zip(header, (c.strip() for c in row), strict=True))
                rid = cells["record_id"]
                if rid not in index:
                    raise fail(
                        "not a record of this site's data (ids are file paths "
                        "relative to the folder, <split>-<index>, or the bundled "
                        "task's ids)",
                        line,
                        "record_id",
                    )
                if rid in seen:
                    raise fail("duplicate record id", line, "record_id")
                seen.add(rid)
                i = index[rid]
                if units is not None:
                    units[i] = cells["unit"]
                for column in columns:
                    try:
                        values[column][i] = _PARSERS[column](cells[column])
                    except CellError as exc:
                        raise fail(f"{exc.problem}; {exc.fix}", line, column) from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise fail(f"unreadable ({exc}); save it as UTF-8 CSV", line + 1) from None
    meta = {c: meta_array(c, vals) for c, vals in values.items()}
    unit_arr = None
    if units is not None:
        # a record without a unit is its own unit
        unit_arr = np.array(
            [u or f"record:{record_ids[i]}" for i, u in enumerate(units)], dtype=str
        )
    return meta, unit_arr


def record_metas(record_ids: np.ndarray, meta: dict[str, np.ndarray]) -> list[RecordMeta]:
    """One :class:`policies.RecordMeta` per record id, from ``Records.meta`` arrays."""
    import numpy as np

    out = []
    for i, rid in enumerate(record_ids):
        kw: dict[str, Any] = {"record_id": str(rid)}
        if "consent_purposes" in meta:
            kw["consented_purposes"] = meta["consent_purposes"][i]
        for column in DATE_COLUMNS:
            if column in meta and not np.isnat(meta[column][i]):
                kw[column] = str(np.datetime_as_string(meta[column][i], unit="s"))
        if "age" in meta and not math.isnan(float(meta["age"][i])):
            kw["age"] = int(meta["age"][i])
        if "minor" in meta and bool(meta["minor"][i]):
            kw["minor"] = True
        for column in ("guardian_consent", "erasure_requested"):
            if column in meta:
                kw[column] = bool(meta[column][i])
        out.append(RecordMeta(**kw))
    return out
