"""One vocabulary and one reader of per-record metadata (fedmeta.data.record_columns)."""

from __future__ import annotations

import csv
import io
import math
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmeta.data.csv_loader import DataError, load_csv
from fedmeta.data.loaders.common import SIDECAR_COLUMNS, read_sidecar
from fedmeta.data.record_columns import (
    FALSE_WORDS,
    META_COLUMNS,
    TRUE_WORDS,
    MetaReadError,
    read_meta_csv,
)
from fedmeta.data.record_meta import RecordMetaError, load_record_meta
from fedmeta.data.records import Records
from fedmeta.data.schema import ColumnsSpec

QUIET = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture]}
IDS = np.array([f"r-{i}" for i in range(6)])


def records(meta: dict | None = None) -> Records:
    n = len(IDS)
    return Records(
        x=np.zeros((n, 1), np.float32),
        y=np.zeros(n, np.int64),
        groups=np.zeros(n, np.int64),
        record_ids=IDS,
        meta=meta or {},
    )


def write_rows(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path


def test_every_reader_knows_the_same_columns():
    schema_roles = [k for k in ColumnsSpec.model_fields if k != "record_id"]
    assert sorted(schema_roles) == sorted(META_COLUMNS)
    assert ("record_id", "unit", *META_COLUMNS) == SIDECAR_COLUMNS


def test_records_meta_csv_and_a_sidecar_mean_the_same(tmp_path):
    header = [
        "record_id",
        "consent_purposes",
        "age",
        "minor",
        "guardian_consent",
        "erasure_requested",
        "collected_at",
    ]
    rows = [
        ["r-0", "research.model-training; care.treatment", "17.9", "", "Y", "n", "2024-01-02"],
        ["r-1", "", "", "yes", "no", "2025-02-03", "2024-01-02T10:00:00+02:00"],
    ]
    site = tmp_path / "site"
    site.mkdir()
    write_rows(site / "records-meta.csv", header, rows)
    from_site = load_record_meta(site, records())
    meta, units = read_sidecar(write_rows(tmp_path / "records.csv", header, rows), IDS)
    assert units is None
    assert from_site == load_record_meta(tmp_path, records(meta))
    first, second = from_site[0], from_site[1]
    assert first.consented_purposes == {"research.model-training", "care.treatment"}
    assert first.age == 17 and first.guardian_consent is True and not first.erasure_requested
    assert second.age is None and second.minor is True and second.is_child(18)
    assert second.erasure_requested is True
    assert second.collected_at == datetime(2024, 1, 2, 8, tzinfo=UTC)
    assert from_site[2].consented_purposes == frozenset() and from_site[2].age is None


def test_the_old_column_name_is_refused_with_the_new_one(tmp_path):
    write_rows(
        tmp_path / "records-meta.csv",
        ["record_id", "consented_purposes"],
        [["r-0", "research.model-training"]],
    )
    with pytest.raises(
        RecordMetaError, match="'consented_purposes' is called 'consent_purposes': rename it"
    ):
        load_record_meta(tmp_path, records())


def test_a_csv_schema_accepts_the_same_words(tmp_path):
    (tmp_path / "s.toml").write_text(
        '[dataset]\nname = "c"\ntask = "classification"\nlabel = "y"\nfeatures = ["a"]\n'
        '[columns]\nguardian_consent = "g"\nminor = "m"\nage = "age"\n'
    )
    (tmp_path / "d.csv").write_text("a,y,g,m,age\n1,0,y,N,54.5\n2,1,n,Y,\n")
    recs, _ = load_csv(tmp_path / "d.csv", tmp_path / "s.toml")
    assert recs.meta["guardian_consent"].tolist() == [True, False]
    assert recs.meta["minor"].tolist() == [False, True]
    assert recs.meta["age"][0] == 54.0 and math.isnan(recs.meta["age"][1])


YES_NO = st.sampled_from(sorted(TRUE_WORDS | FALSE_WORDS)).flatmap(
    lambda w: st.sampled_from([w, w.upper(), w.capitalize()])
)
CELL = {
    "consent_purposes": st.lists(
        st.sampled_from(["research.model-training", "care.x", "a.b"]), max_size=3
    ).map(";".join),
    "age": st.one_of(
        st.just(""), st.integers(0, 150).map(str), st.floats(0, 150, allow_nan=False).map(repr)
    ),
    "minor": YES_NO | st.just(""),
    "guardian_consent": YES_NO | st.just(""),
    "erasure_requested": YES_NO | st.just("") | st.dates().map(date.isoformat),
    **{
        c: st.just("") | st.dates(date(1900, 1, 1), date(2100, 1, 1)).map(date.isoformat)
        for c in (
            "consent_withdrawn_at",
            "collected_at",
            "objected_at",
            "restricted_at",
            "opted_out_at",
        )
    },
}


@settings(max_examples=60, **QUIET)
@given(
    data=st.data(),
    columns=st.lists(st.sampled_from(META_COLUMNS), min_size=1, max_size=5, unique=True),
)
def test_well_formed_cells_are_read(tmp_path, data, columns):
    rows = [[rid, *(data.draw(CELL[c]) for c in columns)] for rid in IDS[:4]]
    path = write_rows(tmp_path / "ok.csv", ["record_id", *columns], rows)
    meta, _ = read_meta_csv(path, IDS)
    assert set(meta) == set(columns) and all(len(v) == len(IDS) for v in meta.values())
    for row_i, row in enumerate(rows):
        for c, cell in zip(columns, row[1:], strict=True):
            got = meta[c][row_i]
            if c == "age":
                assert math.isnan(got) if cell == "" else got == math.floor(float(cell))
            elif c in ("minor", "guardian_consent"):
                assert bool(got) == (cell.lower() in TRUE_WORDS)
            elif c == "erasure_requested":
                assert bool(got) == (cell != "" and cell.lower() not in FALSE_WORDS)


@settings(max_examples=150, **QUIET)
@given(
    column=st.sampled_from(META_COLUMNS),
    cell=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30),
)
def test_any_cell_is_read_or_refused_in_one_line_without_echo(tmp_path, column, cell):
    path = write_rows(tmp_path / "any.csv", ["record_id", column], [["r-1", cell]])
    try:
        meta, _ = read_meta_csv(path, IDS)
    except MetaReadError as exc:
        msg = str(exc)
        assert "\n" not in msg and msg.startswith("any.csv line ")
        if cell.strip() not in {"", "record_id"} and len(cell.strip()) > 3:
            assert cell.strip() not in msg
        with pytest.raises(DataError):  # the loaders' sidecar says the same as a DataError
            read_sidecar(path, IDS)
    else:
        assert set(meta) == {column}


@settings(max_examples=80, **QUIET)
@given(text=st.binary(max_size=200))
def test_any_bytes_give_metadata_or_a_one_line_error(tmp_path, text):
    path = tmp_path / "records-meta.csv"
    path.write_bytes(text)
    try:
        load_record_meta(tmp_path, records())
    except RecordMetaError as exc:
        assert "\n" not in str(exc) and "records-meta.csv" in str(exc)
