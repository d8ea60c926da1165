"""Per-record policy metadata of a site's records (pseudonymous only).

For an institution's own CSV the metadata columns are read by
``fedmeta.data.csv_loader`` (``Records.meta``); for image folders and ``.npz``
files by their sidecar CSV. For the bundled tasks a site may keep them beside its
data in ``<site-dir>/records-meta.csv``, with the same columns and meanings
(:mod:`fedmeta.data.record_columns`, the one vocabulary)::

    record_id,consent_purposes,consent_withdrawn_at,age,guardian_consent,collected_at
    digit-17,research.model-training,2025-03-01,,,2019-05-02
    digit-40,,,12,no,

A record without a row has no consent on file and unknown age and collection
date. Errors are one line naming the file, line and column.
"""

from __future__ import annotations

from pathlib import Path

from fedmeta.data.record_columns import MetaReadError, read_meta_csv, record_metas
from fedmeta.data.records import Records
from policies import RecordMeta

META_FILE = "records-meta.csv"


class RecordMetaError(ValueError):
    """The record metadata file is malformed (one line, names file/line/column)."""


def load_record_meta(site_dir: Path, records: Records) -> list[RecordMeta]:
    """One RecordMeta per record, in the order of ``records``: from the records' own
    metadata when their loader read some, else from ``<site_dir>/records-meta.csv``."""
    if records.meta:
        return record_metas(records.record_ids, records.meta)
    path = Path(site_dir) / META_FILE
    try:
        meta, _ = read_meta_csv(path, records.record_ids, allow_unit=False, shown=str(path))
    except MetaReadError as exc:
        raise RecordMetaError(str(exc)) from None
    return record_metas(records.record_ids, meta)
