"""Per-record policy metadata of a site's records (pseudonymous only).

For an institution's own CSV the metadata columns are read by
``fedmeta.data.csv_loader`` (``Records.meta``). For the bundled tasks a site
may keep them beside its data in ``<site-dir>/records-meta.csv``::

    record_id,consented_purposes,consent_withdrawn_at,age,minor,guardian_consent,collected_at,erasure_requested
    digit-17,research.model-training,2025-03-01,,,,2019-05-02,
    digit-40,,,12,,false,,

``consented_purposes`` is ';'-separated; dates are ISO 8601; empty cells are
unknown. A record without a row has no consent on file and unknown age and
collection date. Errors name the file, line and column.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from fedmeta.data.records import Records
from policies import RecordMeta
from policies.records import RECORD_COLUMNS

META_FILE = "records-meta.csv"


class RecordMetaError(ValueError):
    """The record metadata file is malformed (one line, names file/line/column)."""


_TRUE = {"true", "1", "yes", "y"}
_FALSE = {"false", "0", "no", "n"}


def _cell(column: str, text: str):
    """A metadata cell as RecordMeta expects it."""
    low = text.strip().lower()
    if column == "age":
        return int(low)
    if column in ("minor", "guardian_consent", "erasure_requested"):
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        if column != "erasure_requested":
            raise ValueError(f"column {column!r}: expected true/false")
    return text.strip()


def _from_loader(records: Records) -> list[RecordMeta]:
    """Records.meta columns written by the CSV loader -> RecordMeta."""
    meta = records.meta
    out = []
    for i, rid in enumerate(records.record_ids):
        kw: dict = {"record_id": str(rid)}
        if "consent_purposes" in meta:
            kw["consented_purposes"] = meta["consent_purposes"][i]
        for src, dst in (("consent_withdrawn_at", "consent_withdrawn_at"),
                         ("collected_at", "collected_at"), ("objected_at", "objected_at"),
                         ("restricted_at", "restricted_at"), ("opted_out_at", "opted_out_at")):
            if src in meta and not np.isnat(meta[src][i]):
                kw[dst] = str(np.datetime_as_string(meta[src][i], unit="s"))
        if "age" in meta and not math.isnan(float(meta["age"][i])):
            kw["age"] = int(meta["age"][i])
        if "guardian_consent" in meta:
            kw["guardian_consent"] = bool(meta["guardian_consent"][i])
        if "erasure_requested" in meta:
            kw["erasure_requested"] = bool(meta["erasure_requested"][i])
        out.append(RecordMeta(**kw))
    return out


def load_record_meta(site_dir: Path, records: Records) -> list[RecordMeta]:
    """One RecordMeta per record, in the order of ``records``."""
    if records.meta:
        return _from_loader(records)
    path = Path(site_dir) / META_FILE
    by_id: dict[str, RecordMeta] = {}
    if path.exists():
        known = set(records.record_ids.tolist())
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                header = reader.fieldnames or []
                unknown = [c for c in header if c not in RECORD_COLUMNS]
                if "record_id" not in header or unknown:
                    raise RecordMetaError(
                        f"{path} line 1: header must have record_id and only "
                        f"{', '.join(RECORD_COLUMNS)} (unknown: {unknown})")
                for line, row in enumerate(reader, start=2):
                    rid = row["record_id"]
                    if rid not in known:
                        raise RecordMetaError(f"{path} line {line}, column 'record_id': "
                                              "not a record of this site")
                    if rid in by_id:
                        raise RecordMetaError(f"{path} line {line}, column 'record_id': "
                                              "duplicate record id")
                    try:
                        values = {k: _cell(k, v) for k, v in row.items()
                                  if k and v is not None and v.strip() != ""}
                        by_id[rid] = RecordMeta(**values)
                    except (TypeError, ValueError) as exc:
                        raise RecordMetaError(f"{path} line {line}: {exc}") from None
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise RecordMetaError(f"{path}: cannot read record metadata ({exc})") from None
    return [by_id.get(str(r)) or RecordMeta(record_id=str(r)) for r in records.record_ids]
