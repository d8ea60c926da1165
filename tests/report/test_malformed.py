"""Unsigned files with any JSON in any field: the report is written or refused with a
one-line error; it never crashes (hypothesis over the run's own files)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmeta.report import ReportError, UnverifiedRunError, build_report

pytestmark = pytest.mark.slow

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-10, 10**6)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def scratch(run_dir: Path) -> Path:
    d = Path(tempfile.mkdtemp(prefix="malformed-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _replace(doc: object, path: list, value: object) -> None:
    for key in path[:-1]:
        doc = doc[key]
    doc[path[-1]] = value


def _paths(doc: object, prefix: list) -> list[list]:
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, [*prefix, k])
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:3]):
            out += _paths(v, [*prefix, i])
    return out


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_any_value_in_an_unsigned_file_is_written_or_refused(run_dir, scratch, data):
    name = data.draw(
        st.sampled_from(["metrics.jsonl", "summary.json", "policy-decisions.json", "config.json"])
    )
    run = scratch / "run"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("report*"))
    path = run / name
    if name == "metrics.jsonl":
        docs = [json.loads(x) for x in path.read_text().splitlines()]
        doc = docs[data.draw(st.integers(0, len(docs) - 1))]
    else:
        docs = [json.loads(path.read_text())]
        doc = docs[0]
    where = data.draw(st.sampled_from(_paths(doc, [])))
    _replace(doc, where, data.draw(JSON))
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    try:
        build_report(run, allow_unverified=True)
    except (ReportError, UnverifiedRunError) as exc:
        assert "\n" not in str(exc)
