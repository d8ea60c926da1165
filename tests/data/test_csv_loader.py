"""Tests for the institution CSV loader (fedmeta.data.csv_loader) with real files."""

from __future__ import annotations

import csv
import io
import math
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fedmeta.data
from fedmeta.data.csv_loader import (
    CsvSchema,
    DataError,
    LoadReport,
    load_csv,
    load_schema,
    parse_schema,
)
from fedmeta.data.records import Records

EXAMPLES = Path(fedmeta.data.__file__).parent / "examples"

SCHEMA = """\
[dataset]
name = "test-cohort"
task = "classification"
label = "diagnosis"
features = ["age_band", "bmi", "glucose"]
classes = ["benign", "malignant"]
group = "ward"
{extra_dataset}
[columns]
record_id = "pid"
consent_purposes = "consent"
consent_withdrawn_at = "withdrawn"
age = "age"
guardian_consent = "guardian_ok"
collected_at = "collected"
erasure_requested = "erasure"
"""

HEADER = (
    "pid,ward,age,age_band,bmi,glucose,diagnosis,consent,withdrawn,guardian_ok,collected,erasure"
)
GOOD_ROWS = [
    "P1,north,34,3,22.5,5.1,benign,research;care,,,2024-01-02,",
    "P2,south,12,1,18.25,4.75,malignant,research,2025-03-01,yes,2023-12-31T08:30:00,no",
    "P3,north,,5,30,6.5,benign,,,,,2025-02-03",
]


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def schema_file(tmp_path: Path, extra_dataset: str = "", text: str | None = None) -> Path:
    body = SCHEMA.format(extra_dataset=extra_dataset) if text is None else text
    return write(tmp_path / "schema.toml", body)


def csv_file(tmp_path: Path, lines: list[str], name: str = "cohort.csv") -> Path:
    return write(tmp_path / name, "\n".join(lines) + "\n")


def load_err(csv_path: Path, schema: CsvSchema | Path) -> DataError:
    with pytest.raises(DataError) as info:
        load_csv(csv_path, schema)
    err = info.value
    assert len(str(err).splitlines()) == 1, str(err)
    return err


# ---------------------------------------------------------------- good files


def test_good_file_loads_every_value_exactly(tmp_path: Path) -> None:
    path = csv_file(tmp_path, [HEADER, *GOOD_ROWS])
    records, report = load_csv(path, schema_file(tmp_path))

    assert isinstance(records, Records)
    assert records.x.dtype == np.float32 and records.x.shape == (3, 3)
    np.testing.assert_array_equal(
        records.x, np.array([[3, 22.5, 5.1], [1, 18.25, 4.75], [5, 30, 6.5]], dtype=np.float32)
    )
    assert records.y.dtype == np.int64 and records.y.tolist() == [0, 1, 0]
    assert records.groups.tolist() == [0, 1, 0]
    assert records.record_ids.tolist() == ["P1", "P2", "P3"]
    meta = records.meta
    assert set(meta) == {
        "consent_purposes",
        "consent_withdrawn_at",
        "age",
        "guardian_consent",
        "collected_at",
        "erasure_requested",
    }
    assert meta["consent_purposes"].dtype == object
    assert list(meta["consent_purposes"]) == [
        frozenset({"research", "care"}),
        frozenset({"research"}),
        frozenset(),
    ]
    assert meta["consent_withdrawn_at"].dtype == np.dtype("datetime64[s]")
    assert np.isnat(meta["consent_withdrawn_at"]).tolist() == [True, False, True]
    assert meta["consent_withdrawn_at"][1] == np.datetime64("2025-03-01T00:00:00")
    assert meta["collected_at"].tolist() == [
        datetime(2024, 1, 2),
        datetime(2023, 12, 31, 8, 30),
        None,  # NaT
    ]
    assert meta["age"].dtype == np.float64
    assert meta["age"][:2].tolist() == [34.0, 12.0] and math.isnan(meta["age"][2])
    assert meta["guardian_consent"].tolist() == [False, True, False]
    assert meta["erasure_requested"].tolist() == [False, False, True]

    assert report == LoadReport(
        source="cohort.csv",
        rows_read=3,
        rows_used=3,
        rows_dropped={},
        columns_read=(
            "age_band",
            "bmi",
            "glucose",
            "diagnosis",
            "ward",
            "pid",
            "consent",
            "withdrawn",
            "age",
            "guardian_ok",
            "collected",
            "erasure",
        ),
        columns_ignored=(),
        class_names=("benign", "malignant"),
        group_names=("north", "south"),
    )


def test_round_trip_of_generated_records(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    n = 40
    x = rng.normal(0, 100, size=(n, 3)).astype(np.float32)
    y = rng.integers(0, 2, size=n)
    ages = rng.integers(0, 100, size=n).astype(float)
    ages[::7] = np.nan
    lines = [HEADER]
    for i in range(n):
        age = "" if math.isnan(ages[i]) else str(int(ages[i]))
        feats = ",".join(repr(float(v)) for v in x[i])
        erasure = "true" if i % 5 == 0 else ""
        lines.append(
            f"id-{i:03d},w{i % 4},{age},{feats},{['benign', 'malignant'][y[i]]},"
            f'"a;b",,{"1" if i % 3 == 0 else "0"},2024-05-{1 + i % 28:02d},{erasure}'
        )
    records, report = load_csv(csv_file(tmp_path, lines), schema_file(tmp_path))
    np.testing.assert_array_equal(records.x, x)
    np.testing.assert_array_equal(records.y, y)
    np.testing.assert_array_equal(records.groups, np.arange(n) % 4)
    assert records.record_ids.tolist() == [f"id-{i:03d}" for i in range(n)]
    np.testing.assert_array_equal(records.meta["age"], ages)
    assert records.meta["guardian_consent"].tolist() == [i % 3 == 0 for i in range(n)]
    assert records.meta["erasure_requested"].tolist() == [i % 5 == 0 for i in range(n)]
    assert all(p == frozenset({"a", "b"}) for p in records.meta["consent_purposes"])
    assert report.rows_read == report.rows_used == n


def test_regression_without_metadata_generates_row_ids(tmp_path: Path) -> None:
    schema = schema_file(
        tmp_path,
        text='[dataset]\nname = "r"\ntask = "regression"\nlabel = "t"\nfeatures = ["a", "b"]\n',
    )
    path = csv_file(tmp_path, ["a,b,t", "1,2,0.5", "3,4,-1e-3", "5,6,7"])
    records, report = load_csv(path, schema)
    assert records.y.dtype == np.float32
    np.testing.assert_array_equal(records.y, np.array([0.5, -1e-3, 7], dtype=np.float32))
    assert records.record_ids.tolist() == ["row-1", "row-2", "row-3"]
    assert records.groups.tolist() == [0, 0, 0]
    assert records.meta == {}
    assert report.group_names == () and report.class_names == ()


def test_integer_labels_without_classes(tmp_path: Path) -> None:
    schema = schema_file(
        tmp_path,
        text='[dataset]\nname = "c"\ntask = "classification"\nlabel = "y"\nfeatures = ["a"]\n',
    )
    records, _ = load_csv(csv_file(tmp_path, ["a,y", "1,0", "2,2", "3,1"]), schema)
    assert records.y.tolist() == [0, 2, 1] and records.y.dtype == np.int64


def test_bom_crlf_blank_lines_and_quoting(tmp_path: Path) -> None:
    body = "\r\n".join([HEADER, "", *GOOD_ROWS[:2], "  ", ""]) + "\r\n"
    body = body.replace("research;care", '"research; care"')
    path = write(tmp_path / "bom.csv", b"\xef\xbb\xbf" + body.encode())
    records, report = load_csv(path, schema_file(tmp_path))
    assert records.record_ids.tolist() == ["P1", "P2"]
    assert records.meta["consent_purposes"][0] == frozenset({"research", "care"})
    assert report.blank_lines == 3
    # old-Mac CR-only line endings
    path = write(tmp_path / "cr.csv", "\r".join([HEADER, *GOOD_ROWS]) + "\r")
    assert load_csv(path, schema_file(tmp_path))[0].record_ids.tolist() == ["P1", "P2", "P3"]


def test_other_delimiter_and_header_whitespace(tmp_path: Path) -> None:
    schema = schema_file(tmp_path, extra_dataset='delimiter = ";"')
    lines = [" " + HEADER.replace(",", " ; ")]
    lines += [r.replace("research;care", "care").replace(",", ";") for r in GOOD_ROWS]
    records, _ = load_csv(csv_file(tmp_path, lines), schema)
    assert records.x.shape == (3, 3)


def test_schema_may_be_given_as_path_or_model(tmp_path: Path) -> None:
    path = csv_file(tmp_path, [HEADER, *GOOD_ROWS])
    schema_path = schema_file(tmp_path)
    a, ra = load_csv(path, schema_path)
    b, rb = load_csv(str(path), load_schema(str(schema_path)))
    np.testing.assert_array_equal(a.x, b.x)
    assert ra == rb


def test_example_cohort(tmp_path: Path) -> None:
    csv_path, schema_path = EXAMPLES / "cohort.csv", EXAMPLES / "cohort.schema.toml"
    records, report = load_csv(csv_path, schema_path)
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    kept = [r for r in rows if r["glucose"]]
    assert 55 <= len(rows) <= 70
    assert report.rows_read == len(rows)
    assert report.rows_dropped == {"missing value in 'glucose'": len(rows) - len(kept)}
    assert report.n_dropped == 2
    assert report.rows_used == len(records) == len(kept)
    assert report.columns_ignored == ("note",)
    assert records.record_ids.tolist() == [r["pid"] for r in kept]
    assert records.y.tolist() == [["benign", "malignant"].index(r["diagnosis"]) for r in kept]
    np.testing.assert_array_equal(
        records.x,
        np.array([[float(r[c]) for c in ("age_band", "bmi", "glucose")] for r in kept], np.float32),
    )
    assert set(records.y.tolist()) == {0, 1}
    minors = records.meta["age"] < 18
    assert minors.any() and records.meta["guardian_consent"][minors].any()
    assert records.meta["erasure_requested"].sum() >= 1
    assert (~np.isnat(records.meta["consent_withdrawn_at"])).any()
    assert not np.isnat(records.meta["collected_at"]).any()
    assert all(r.startswith("P") for r in records.record_ids)  # pseudonymous
    assert len(set(report.group_names)) == 3


# ---------------------------------------------------------------- minimisation


def test_unnamed_columns_are_ignored_reported_and_never_parsed(tmp_path: Path) -> None:
    lines = [HEADER + ",full_name,notes"]
    lines += [row + ',Alice Example,"not, a number\nmultiline"' for row in GOOD_ROWS]
    records, report = load_csv(csv_file(tmp_path, lines), schema_file(tmp_path))
    assert report.columns_ignored == ("full_name", "notes")
    assert "full_name" not in report.columns_read and "notes" not in report.columns_read
    assert set(report.columns_read) | set(report.columns_ignored) == set(lines[0].split(","))
    everything = [records.x, records.y, records.groups, records.record_ids, *records.meta.values()]
    for arr in everything:
        assert not any("Alice" in str(v) or "multiline" in str(v) for v in arr.ravel())
    assert "Alice" not in repr(report)


def test_only_features_reach_x(tmp_path: Path) -> None:
    # metadata such as age is read for the policies but never becomes a feature column
    records, _ = load_csv(csv_file(tmp_path, [HEADER, *GOOD_ROWS]), schema_file(tmp_path))
    assert records.x.shape[1] == 3
    assert 34.0 not in records.x


# ---------------------------------------------------------------- drop-row


def test_drop_row_counts_each_dropped_row_once(tmp_path: Path) -> None:
    schema = schema_file(tmp_path, extra_dataset='missing = "drop-row"')
    lines = [
        HEADER,
        GOOD_ROWS[0],
        "P2,south,12,1,,4.75,malignant,research,,yes,,",  # empty bmi
        "P3,north,40,4,,,benign,,,,,",  # empty bmi and glucose: counted once, under bmi
        "P4,north,40,4,20,5,,,,,,",  # empty label
        "P5,,40,4,20,5,benign,,,,,",  # empty group
        GOOD_ROWS[2].replace("P3", "P6"),
    ]
    records, report = load_csv(csv_file(tmp_path, lines), schema)
    assert records.record_ids.tolist() == ["P1", "P6"]
    assert report.rows_read == 6 and report.rows_used == 2
    assert report.rows_dropped == {
        "missing value in 'bmi'": 2,
        "missing value in 'diagnosis'": 1,
        "missing value in 'ward'": 1,
    }
    assert report.n_dropped == 4
    assert len(records.meta["age"]) == 2


def test_drop_row_does_not_excuse_bad_values(tmp_path: Path) -> None:
    schema = schema_file(tmp_path, extra_dataset='missing = "drop-row"')
    path = csv_file(tmp_path, [HEADER, GOOD_ROWS[0].replace("22.5", "n/a")])
    err = load_err(path, schema)
    assert "line 2" in str(err) and "'bmi'" in str(err) and "not a number" in str(err)
    # bad metadata on a row that would be dropped is still an error
    path = csv_file(tmp_path, [HEADER, "P1,north,34,3,,5.1,benign,,,maybe,,"])
    err = load_err(path, schema)
    assert "'guardian_ok'" in str(err)


def test_all_rows_dropped_is_an_error(tmp_path: Path) -> None:
    schema = schema_file(tmp_path, extra_dataset='missing = "drop-row"')
    path = csv_file(tmp_path, [HEADER, "P1,north,34,3,,5.1,benign,,,,,"])
    err = load_err(path, schema)
    assert "cohort.csv" in str(err) and "no usable rows" in str(err)
    assert "1 missing value in 'bmi'" in str(err)


# ---------------------------------------------------------------- data errors

BAD_ROWS = [
    # (replacement row 2, expected fragments, fragments that must NOT appear)
    (
        "P1,north,34,3,abc,5.1,benign,,,,,",
        ["line 2", "column 'bmi'", "'abc' is not a number", 'missing = "drop-row"'],
        [],
    ),
    ("P1,north,34,3,nan,5.1,benign,,,,,", ["line 2", "column 'bmi'", "not a finite"], []),
    ("P1,north,34,3,inf,5.1,benign,,,,,", ["line 2", "column 'bmi'", "not a finite"], []),
    ("P1,north,34,3,1e39,5.1,benign,,,,,", ["line 2", "column 'bmi'", "float32"], []),
    ("P1,north,34,3,1_0,5.1,benign,,,,,", ["line 2", "column 'bmi'", "not a number"], []),
    ("P1,north,34,3,,5.1,benign,,,,,", ["line 2", "column 'bmi'", "empty"], []),
    ("P1,north,34,3,2,5.1,maybe,,,,,", ["line 2", "column 'diagnosis'", "not one of classes"], []),
    ("P1,north,34,3,2,5.1,,,,,,", ["line 2", "column 'diagnosis'", "empty"], []),
    ("P1,,34,3,2,5.1,benign,,,,,", ["line 2", "column 'ward'", "empty"], []),
    ("P1,north,34,3,2,5.1,benign,,,,", ["line 2", "11 fields", "12"], []),
    ("P1,north,34,3,2,5.1,benign,,,,,,", ["line 2", "13 fields"], []),
    (
        "P1,north,34,3,2,5.1,benign,,2021-02-30,,,",
        ["line 2", "column 'withdrawn'", "ISO date"],
        ["2021-02-30"],
    ),
    (
        "P1,north,34,3,2,5.1,benign,,,,yesterday-7,",
        ["line 2", "column 'collected'", "ISO date"],
        ["yesterday"],
    ),
    (
        "P1,north,34,3,2,5.1,benign,,,maybe7,,",
        ["line 2", "column 'guardian_ok'", "boolean"],
        ["maybe7"],
    ),
    (
        "P1,north,34,3,2,5.1,benign,,,,,perhaps7",
        ["line 2", "column 'erasure'", "boolean"],
        ["perhaps7"],
    ),
    ("P1,north,-3,3,2,5.1,benign,,,,,", ["line 2", "column 'age'", "age"], ["-3"]),
    ("P1,north,old77,3,2,5.1,benign,,,,,", ["line 2", "column 'age'", "number"], ["old77"]),
    (",north,34,3,2,5.1,benign,,,,,", ["line 2", "column 'pid'", "empty"], []),
    ('P1,north,34,3,2,5.1,"benign,,,,,', ["line 2", "never closed"], []),
    ('P1,north,34,3,2,5.1,"ben"ign,,,,,', ["line 2", "malformed CSV"], []),
]


@pytest.mark.parametrize(("row", "expected", "absent"), BAD_ROWS)
def test_bad_rows(tmp_path: Path, row: str, expected: list[str], absent: list[str]) -> None:
    path = csv_file(tmp_path, [HEADER, row, GOOD_ROWS[1]])
    err = load_err(path, schema_file(tmp_path))
    msg = str(err)
    assert msg.startswith("cohort.csv")
    for fragment in expected:
        assert fragment in msg, (fragment, msg)
    for fragment in absent:
        assert fragment not in msg, (fragment, msg)
    assert err.path == path and err.line == 2


def test_error_line_numbers_count_blank_and_multiline_rows(tmp_path: Path) -> None:
    good_quoted = GOOD_ROWS[0].replace("research;care", '"research\ncare"')
    path = csv_file(tmp_path, [HEADER, "", good_quoted, GOOD_ROWS[1], "P9,n,1,1,x,1,benign,,,,,"])
    err = load_err(path, schema_file(tmp_path))
    assert "cohort.csv line 6, column 'bmi'" in str(err)


def test_duplicate_record_id_names_both_lines_without_the_id(tmp_path: Path) -> None:
    path = csv_file(tmp_path, [HEADER, *GOOD_ROWS, GOOD_ROWS[1]])
    err = load_err(path, schema_file(tmp_path))
    msg = str(err)
    assert "line 5" in msg and "line 3" in msg and "column 'pid'" in msg and "unique" in msg
    assert "P2" not in msg


@pytest.mark.parametrize(
    ("label", "fragment"),
    [
        ("1.0", "not an integer"),
        ("-1", "out of range"),
        ("1000", "out of range"),
        ("9" * 5000, "out of range"),
        ("x", "integer"),
    ],
)
def test_bad_integer_labels_without_classes(tmp_path: Path, label: str, fragment: str) -> None:
    schema = schema_file(
        tmp_path,
        text='[dataset]\nname = "c"\ntask = "classification"\nlabel = "y"\nfeatures = ["a"]\n',
    )
    err = load_err(csv_file(tmp_path, ["a,y", "1,0", f"2,{label}"]), schema)
    assert "cohort.csv line 3, column 'y'" in str(err) and fragment in str(err)


def test_non_numeric_regression_label(tmp_path: Path) -> None:
    schema = schema_file(
        tmp_path,
        text='[dataset]\nname = "r"\ntask = "regression"\nlabel = "t"\nfeatures = ["a"]\n',
    )
    err = load_err(csv_file(tmp_path, ["a,t", "1,high"]), schema)
    assert "cohort.csv line 2, column 't'" in str(err) and "not a number" in str(err)


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (b"", ["cohort.csv", "empty"]),
        (b"\xef\xbb\xbf\r\n\r\n", ["cohort.csv", "empty"]),
        (b"1,2,3\n4,5,6\n", ["cohort.csv line 1", "header"]),
        (
            HEADER.replace("bmi", "age_band").encode(),
            ["cohort.csv line 1", "'age_band'", "distinct"],
        ),
        (HEADER.replace(",glucose", "").encode() + b"\n", ["cohort.csv line 1", "'glucose'"]),
        (HEADER.replace("pid", "id").encode() + b"\n", ["cohort.csv line 1", "'pid'", "header"]),
        (HEADER.encode() + b"\n", ["cohort.csv", "no data rows"]),
        (
            HEADER.encode() + b"\n" + GOOD_ROWS[0].encode().replace(b"north", b"n\xf6rth"),
            ["cohort.csv line 2", "column 'ward'", "UTF-8"],
        ),
        ("a,b\n1,2\n".encode("utf-16"), ["cohort.csv line 1", "UTF-8"]),
    ],
)
def test_file_level_errors(tmp_path: Path, content: bytes, fragments: list[str]) -> None:
    path = write(tmp_path / "cohort.csv", content)
    msg = str(load_err(path, schema_file(tmp_path)))
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_missing_or_unreadable_files(tmp_path: Path) -> None:
    schema = schema_file(tmp_path)
    msg = str(load_err(tmp_path / "nope.csv", schema))
    assert "nope.csv" in msg and "cannot open" in msg
    (tmp_path / "dir.csv").mkdir()
    assert "dir.csv" in str(load_err(tmp_path / "dir.csv", schema))
    path = csv_file(tmp_path, [HEADER, *GOOD_ROWS])
    msg = str(load_err(path, tmp_path / "absent.toml"))
    assert "absent.toml" in msg and "cannot read" in msg


# ---------------------------------------------------------------- schema errors

MINIMAL = '[dataset]\nname = "c"\ntask = "classification"\nlabel = "y"\nfeatures = ["a"]\n'


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ('[dataset]\nname = "c"\ntask = classification\n', ["line 3", "TOML"]),
        ('[dataset\nname = "c"\n', ["line 1", "TOML"]),
        (MINIMAL + "colour = 1\n", ["line 6", "unknown key [dataset].colour"]),
        (MINIMAL + "[extras]\n", ["line 6", "unknown table or key 'extras'"]),
        (MINIMAL + "[columns]\nrecord = 'pid'\n", ["line 7", "unknown key [columns].record"]),
        ('[dataset]\nname = "c"\nlabel = "y"\nfeatures = ["a"]\n', ["[dataset].task", "missing"]),
        (
            '[dataset]\nname = "c"\ntask = "classification"\nfeatures = ["a"]\n',
            ["[dataset].label", "missing"],
        ),
        ("", ["[dataset]", "missing"]),
        (MINIMAL.replace('["a"]', "[]"), ["line 5", "[dataset].features", "empty"]),
        (MINIMAL.replace('["a"]', '["a", "y"]'), ["line 5", "[dataset].features", "label"]),
        (MINIMAL.replace('["a"]', '["a", "a"]'), ["line 5", "more than once"]),
        (MINIMAL.replace('["a"]', '"a"'), ["line 5", "[dataset].features"]),
        (MINIMAL.replace('["a"]', '["a", 3]'), ["line 5", "[dataset].features[1]"]),
        (MINIMAL.replace('"classification"', '"clustering"'), ["line 3", "[dataset].task"]),
        (MINIMAL + 'missing = "ignore"\n', ["line 6", "[dataset].missing"]),
        (MINIMAL + 'delimiter = ",,"\n', ["line 6", "[dataset].delimiter"]),
        (MINIMAL + 'delimiter = "\\""\n', ["line 6", "[dataset].delimiter"]),
        (MINIMAL + "classes = []\n", ["line 6", "[dataset].classes", "empty"]),
        (
            MINIMAL.replace('"classification"', '"regression"') + 'classes = ["a"]\n',
            ["line 6", "[dataset].classes", "classification"],
        ),
        (MINIMAL + 'group = "y"\n', ["line 6", "[dataset].group", "label"]),
        (MINIMAL + 'features = ["b"]\n', ["line 6", "TOML"]),
        (MINIMAL + '[columns]\nrecord_id = "a"\n', ["record_id", "feature"]),
        (MINIMAL + '[columns]\nage = "y"\n', ["[columns].age", "label"]),
        (MINIMAL + '[columns]\nage = "z"\ncollected_at = "z"\n', ["'z'", "more than one role"]),
        (MINIMAL.replace('label = "y"', 'label = " y"'), ["line 4", "whitespace"]),
    ],
)
def test_schema_errors(tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = write(tmp_path / "my.schema.toml", text)
    with pytest.raises(DataError) as info:
        load_schema(path)
    msg = str(info.value)
    assert len(msg.splitlines()) == 1
    assert msg.startswith("my.schema.toml")
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    # the same through load_csv
    csv_path = csv_file(tmp_path, ["a,y", "1,0"])
    assert str(load_err(csv_path, path)) == msg


def test_schema_file_problems(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"^absent\.toml: cannot read"):
        load_schema(tmp_path / "absent.toml")
    bad = write(tmp_path / "latin.toml", MINIMAL.encode() + b"# caf\xe9\n")
    with pytest.raises(DataError, match=r"^latin\.toml line 6: .*UTF-8"):
        load_schema(bad)
    bom = write(tmp_path / "bom.toml", b"\xef\xbb\xbf" + MINIMAL.encode())
    assert load_schema(bom).dataset.features == ["a"]
    deep = write(tmp_path / "deep.toml", "a = " + "[" * 5000 + "]" * 5000)
    with pytest.raises(DataError, match="deep.toml"):
        load_schema(deep)


def test_schema_defaults_and_columns_read() -> None:
    schema = parse_schema(MINIMAL)
    assert schema.dataset.delimiter == ","
    assert schema.dataset.missing == "error"
    assert schema.dataset.classes is None and schema.dataset.group is None
    assert schema.columns.declared() == {}
    assert schema.columns_read == ("a", "y")
    example = load_schema(EXAMPLES / "cohort.schema.toml")
    assert example.columns_read[:5] == ("age_band", "bmi", "glucose", "diagnosis", "ward")


# ---------------------------------------------------------------- properties

FUZZ_SCHEMA = parse_schema(
    '[dataset]\nname = "f"\ntask = "classification"\nlabel = "y"\nfeatures = ["a", "b"]\n'
)
FLOAT32_MAX = float(np.finfo(np.float32).max)


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def _oracle_number(cell: str) -> float | None:
    """Independent statement of what a valid feature is: a finite float32 decimal."""
    s = cell.strip()
    if not s or set(s) - set("0123456789+-.eE"):
        return None
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) and abs(v) <= FLOAT32_MAX else None


def _oracle_label(cell: str) -> int | None:
    s = cell.strip()
    if not s or set(s) - set("0123456789+-"):
        return None
    try:
        v = int(s)
    except ValueError:
        return None
    return v if 0 <= v < 1000 else None


def _check_accepted(text: str, records: Records, report: LoadReport) -> None:
    """Whatever was accepted must be exactly the well-formed rows of the file."""
    rows = [r for r in csv.reader(io.StringIO(text, newline="")) if r and r != [""]]
    rows = [r for r in rows if not (len(r) == 1 and not r[0].strip())]
    header = [h.strip() for h in rows[0]]
    data = rows[1:]
    assert report.rows_read == len(data) == len(records)
    ia, ib, iy = header.index("a"), header.index("b"), header.index("y")
    for i, row in enumerate(data):
        assert len(row) == len(header)
        expect = [_oracle_number(row[ia]), _oracle_number(row[ib])]
        assert None not in expect
        assert records.x[i].tolist() == np.array(expect, dtype=np.float32).tolist()
        assert records.y[i] == _oracle_label(row[iy])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_arbitrary_bytes_raise_only_data_error(scratch: Path, content: bytes) -> None:
    path = write(scratch / "fuzz.csv", content)
    try:
        records, report = load_csv(path, FUZZ_SCHEMA)
    except DataError as e:
        assert len(str(e).splitlines()) == 1
        assert "fuzz.csv" in str(e)
        return
    _check_accepted(content.decode("utf-8-sig"), records, report)


CELLS = st.one_of(
    st.sampled_from(
        [
            "0",
            "1",
            "2",
            "-1.5",
            " 3 ",
            ".5",
            "1e3",
            "7.",
            "1e39",
            "nan",
            "inf",
            "",
            "abc",
            "1,5",
            '"',
            "1_0",
            "०",
            "\n",
            "3\n",
            "0x1",
        ]
    ),
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(repr),
    st.integers(-5, 5).map(str),
    st.text(max_size=6),
)


VALID_NUMBER = st.one_of(
    st.sampled_from(["0", "-1.5", " 3 ", ".5", "1e3", "7.", "+2", "-0.0", "3.4e38"]),
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(repr),
    st.integers(-(10**6), 10**6).map(str),
)
VALID_LABEL = st.integers(0, 999).map(str) | st.sampled_from(["0", " 1", "+2", "-0", "007"])


def to_csv(rows: list[list[str]], newline: str, quote_all: bool) -> str:
    """RFC 4180 writer (csv.writer leaves a lone CR unquoted when the terminator is LF)."""

    def field(c: str) -> str:
        if quote_all or any(ch in c for ch in ',"\r\n'):
            return '"' + c.replace('"', '""') + '"'
        return c

    return "".join(",".join(field(c) for c in row) + newline for row in rows)


@st.composite
def mutated_rows(draw: st.DrawFn) -> tuple[list[str], list[list[str]]]:
    """A header and well-formed rows, then 0-2 mutations (a bad cell, a field added/removed)."""
    header = draw(st.permutations(["a", "b", "y", "junk"]))
    rows = []
    for _ in range(draw(st.integers(0, 6))):
        cells = {
            "a": draw(VALID_NUMBER),
            "b": draw(VALID_NUMBER),
            "y": draw(VALID_LABEL),
            "junk": draw(st.text(max_size=6)),
        }
        rows.append([cells[h] for h in header])
    for _ in range(draw(st.integers(0, 2)) if rows else 0):
        row = rows[draw(st.integers(0, len(rows) - 1))]
        kind = draw(st.sampled_from(["cell", "cell", "add", "remove"]))
        if kind == "cell":
            row[draw(st.integers(0, len(row) - 1))] = draw(CELLS)
        elif kind == "add":
            row.append(draw(CELLS))
        elif len(row) > 1:
            row.pop(draw(st.integers(0, len(row) - 1)))
    return list(header), rows


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=mutated_rows(), crlf=st.booleans(), quote_all=st.booleans())
def test_structured_csv_accepts_exactly_the_valid_files(
    scratch: Path, case: tuple[list[str], list[list[str]]], crlf: bool, quote_all: bool
) -> None:
    header, rows = case
    text = to_csv([header, *rows], "\r\n" if crlf else "\n", quote_all)
    path = write(scratch / "rows.csv", text)

    pos = {name: i for i, name in enumerate(header)}
    data = [r for r in rows if not (len(r) == 1 and not r[0].strip())]
    valid = bool(data) and all(
        len(r) == 4
        and _oracle_number(r[pos["a"]]) is not None
        and _oracle_number(r[pos["b"]]) is not None
        and _oracle_label(r[pos["y"]]) is not None
        for r in data
    )
    event("valid file" if valid else "invalid file")
    if not valid:
        with pytest.raises(DataError) as info:
            load_csv(path, FUZZ_SCHEMA)
        assert "rows.csv" in str(info.value) and len(str(info.value).splitlines()) == 1
        return
    records, report = load_csv(path, FUZZ_SCHEMA)
    assert report.columns_ignored == ("junk",)
    _check_accepted(text, records, report)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=300))
def test_arbitrary_schema_text_raises_only_data_error(text: str) -> None:
    try:
        schema = parse_schema(text, source="s.toml")
    except DataError as e:
        assert str(e).startswith("s.toml") and len(str(e).splitlines()) == 1
    else:
        assert isinstance(schema, CsvSchema)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=st.binary(max_size=200))
def test_arbitrary_schema_bytes_raise_only_data_error(scratch: Path, content: bytes) -> None:
    path = write(scratch / "fuzz.toml", content)
    try:
        load_schema(path)
    except DataError as e:
        assert str(e).startswith("fuzz.toml") and len(str(e).splitlines()) == 1


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return (
            '"'
            + "".join(
                c if c.isalnum() or c in " _-;," else f"\\u{ord(c):04x}"
                for c in v
                if ord(c) < 0x10000
            )
            + '"'
        )
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return str(v)


KEYS = [
    "name",
    "task",
    "label",
    "features",
    "classes",
    "group",
    "delimiter",
    "missing",
    "record_id",
    "age",
    "other",
]
VALUES = st.one_of(
    st.sampled_from(["classification", "regression", "error", "drop-row", ",", ";", "a", "y"]),
    st.text(max_size=4),
    st.integers(-2, 2),
    st.booleans(),
    st.lists(st.sampled_from(["a", "b", "y", "", " a"]) | st.integers(0, 2), max_size=3),
)


BASE_DATASET = {"name": "n", "task": "classification", "label": "y", "features": ["a", "b"]}


@settings(max_examples=150, deadline=None)
@given(
    changes=st.just({}) | st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=2),
    removed=st.just(set()) | st.sets(st.sampled_from(list(BASE_DATASET)), max_size=1),
    columns=st.none()
    | st.just({"record_id": "pid", "age": "age"})
    | st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=3),
)
def test_structured_schema_raises_only_data_error(
    changes: dict[str, object], removed: set[str], columns: dict[str, object] | None
) -> None:
    dataset = {k: v for k, v in {**BASE_DATASET, **changes}.items() if k not in removed}
    text = "[dataset]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in dataset.items())
    if columns is not None:
        text += "[columns]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in columns.items())
    try:
        schema = parse_schema(text, source="s.toml")
    except DataError as e:
        assert len(str(e).splitlines()) == 1
        event("rejected")
        return
    event("accepted")
    ds = schema.dataset
    assert ds.features and ds.label not in ds.features and len(set(ds.features)) == len(ds.features)


def test_rights_columns_reach_the_record_rules(tmp_path: Path) -> None:
    """Objection, restriction and opt-out dates in the site's CSV exclude the records."""
    from datetime import UTC

    from fedmeta.data.record_meta import load_record_meta
    from policies import evaluate_records, example_run_declaration, example_site_manifest

    text = SCHEMA.format(extra_dataset="") + (
        'objected_at = "objected"\nrestricted_at = "restricted"\nopted_out_at = "opted_out"\n'
    )
    header = HEADER + ",objected,restricted,opted_out"
    rows = [
        "P1,north,34,3,22.5,5.1,benign,research.model-training,,,2024-01-02,,2025-01-01,,",
        "P2,north,35,3,22.5,5.1,benign,research.model-training,,,2024-01-02,,,2025-02-01,",
        "P3,north,36,3,22.5,5.1,benign,research.model-training,,,2024-01-02,,,,2025-03-01",
        "P4,north,37,3,22.5,5.1,benign,research.model-training,,,2024-01-02,,,,",
    ]
    records, _ = load_csv(csv_file(tmp_path, [header, *rows]), schema_file(tmp_path, text=text))
    meta = load_record_meta(tmp_path, records)
    assert meta[0].objected_at == datetime(2025, 1, 1, tzinfo=UTC)
    verdict = evaluate_records(
        example_run_declaration(), example_site_manifest(), meta, datetime(2026, 1, 1, tzinfo=UTC)
    )
    assert verdict.allowed_mask == (False, False, False, True)
    assert [verdict.excluded_by_rule[r] for r in ("GDPR-21", "GDPR-18", "GDPR-OPT-OUT")] == [1] * 3
