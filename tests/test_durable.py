"""The one durable-append helper: whole lines, fsync-ed, the directory too on creation."""

from __future__ import annotations

import json
import os
import stat

import pytest

from fedmeta import durable


def test_append_fsyncs_the_line_and_a_new_files_directory(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        synced.append(kind)
        real(fd)

    monkeypatch.setattr(durable.os, "fsync", spy)
    path = tmp_path / "log.jsonl"
    durable.append_json_line(path, {"b": 1, "a": [1, 2]})
    assert synced == ["file", "dir"]
    durable.append_json_line(path, {"a": 2}, compact=True)
    assert synced == ["file", "dir", "file"]
    assert path.read_text() == '{"a": [1, 2], "b": 1}\n{"a":2}\n'
    assert [json.loads(x) for x in path.read_text().splitlines()] == [
        {"a": [1, 2], "b": 1},
        {"a": 2},
    ]


def test_a_line_break_is_refused_before_anything_is_written(tmp_path):
    path = tmp_path / "x.jsonl"
    with pytest.raises(ValueError, match="line break"):
        durable.append_line(path, "one\ntwo")
    assert not path.exists()


def test_every_append_only_file_goes_through_it():
    from pathlib import Path

    root = Path(durable.__file__).resolve().parents[1]
    writers = []
    for path in [*(root / "fedmeta").rglob("*.py"), *(root / "server").rglob("*.py")]:
        text = path.read_text(encoding="utf-8")
        if ("open(" in text and ', "a"' in text) and path.name != "durable.py":
            writers.append(path.relative_to(root).as_posix())
    assert writers == []
