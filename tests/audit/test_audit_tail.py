"""Torn vs edited last lines, non-regular files, bounded reads, full fingerprints."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from audit_helpers import LogFixture

from fedmeta.audit import AuditError, AuditLog, AuditReadError, LogStateError, verify_log
from fedmeta.audit.entry import MAX_LINE_BYTES
from fedmeta.audit.keys import fingerprint, grouped, load_public_key

MakeLog = Callable[..., LogFixture]


def test_edited_last_line_is_not_a_crash_and_is_not_repaired(make_log: MakeLog) -> None:
    fx = make_log(3)
    lines = fx.lines()
    lines[-1] = lines[-1].replace(b'"seq":', b'"seq" :', 1)  # still newline-terminated
    lines[-1] = lines[-1][:40] + b"X" + lines[-1][41:]  # breaks the JSON
    fx.write_lines(lines)
    r = verify_log(fx.path)
    assert not r.ok and not r.partial_tail and r.first_bad_seq == len(lines) - 1
    before = fx.path.read_bytes()
    with pytest.raises(AuditError, match="nothing to repair"):
        AuditLog.repair_partial_tail(fx.path, fx.key_path, fx.actor)
    assert fx.path.read_bytes() == before
    with pytest.raises(LogStateError, match="edited"):
        AuditLog.open(fx.path, fx.key_path, fx.actor)


def test_edited_last_line_without_newline_is_not_torn(make_log: MakeLog) -> None:
    fx = make_log(3)
    lines = fx.lines()
    lines[-1] = b'{"seq":9,"forged":true}'  # complete JSON that is no entry, newline removed
    fx.write_lines(lines)
    r = verify_log(fx.path)
    assert not r.ok and not r.partial_tail
    with pytest.raises(AuditError, match="nothing to repair"):
        AuditLog.repair_partial_tail(fx.path, fx.key_path, fx.actor)


@pytest.mark.parametrize("cut", [5, 60, -1])
def test_torn_last_line_is_repaired(make_log: MakeLog, cut: int) -> None:
    fx = make_log(3)
    lines = fx.lines()
    good = len(lines) - 1
    lines[-1] = lines[-1][:cut]  # a prefix of the entry; -1: all but its newline
    fx.write_lines(lines)
    r = verify_log(fx.path)
    assert not r.ok and r.partial_tail and r.entries == good
    entry = AuditLog.repair_partial_tail(fx.path, fx.key_path, fx.actor)
    assert entry.details["partial_bytes"] == len(lines[-1])
    assert verify_log(fx.path).ok


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    with pytest.raises(AuditReadError, match="not a regular file"):
        verify_log(fifo)


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_device_is_refused() -> None:
    with pytest.raises(AuditReadError, match="not a regular file"):
        verify_log(Path("/dev/zero"))


def test_overlong_line_stops_reading(make_log: MakeLog) -> None:
    fx = make_log(2)
    with fx.path.open("ab") as f:
        f.write(b"{" + b"a" * (4 * MAX_LINE_BYTES) + b"\n")
        f.write(b"more\n")
    r = verify_log(fx.path)
    assert not r.ok and not r.partial_tail and r.first_bad_seq == 3
    assert "longer than" in (r.problem or "")


def test_fingerprint_is_full_sha256(make_log: MakeLog) -> None:
    fx = make_log(1)
    fp = fingerprint(load_public_key(fx.pub_path))
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", fp)
    assert verify_log(fx.path).key_fingerprint == fp
    assert grouped(fp).replace(" ", "") == fp


def test_cli_refuses_a_fifo_with_exit_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedmeta.cli import app

    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    res = CliRunner().invoke(app, ["audit", "verify", str(fifo)])
    assert res.exit_code == 2 and "not a regular file" in res.output
