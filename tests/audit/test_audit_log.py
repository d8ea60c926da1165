"""AuditLog: creation, continuation, durability, ownership checks, crash and repair."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from audit_helpers import LogFixture, fill_log

import fedmeta.audit._fs as fs
import fedmeta.audit.log as log_module
from fedmeta.audit import (
    AuditError,
    AuditLog,
    AuditWriteError,
    InvalidEntryError,
    LogStateError,
    PartialTailError,
    verify_log,
)

MakeLog = Callable[..., LogFixture]


def test_first_open_creates_log_key_and_signed_genesis(tmp_path: Path) -> None:
    path, key = tmp_path / "run" / "audit" / "server.jsonl", tmp_path / "keys" / "server.pem"
    with AuditLog.open(path, key, "server") as log:
        head = log.head()
        pem = log.public_key_pem()
    assert head is not None and head.seq == 0
    assert key.exists() and (tmp_path / "keys" / "server.pub.pem").read_bytes() == pem
    r = verify_log(path, public_key=pem)
    assert r.ok and r.entries == 1 and r.head == head


def test_reopen_continues_seq_and_chain(make_log: MakeLog) -> None:
    fx = make_log(3)
    with AuditLog.open(fx.path, fx.key_path, fx.actor) as log:
        assert log.head() == fx.receipts[-1]
        e = log.append("run.end", run_id="run-1")
    assert e.seq == 4 and e.prev == fx.receipts[-1].hash
    assert verify_log(fx.path, receipts=[*fx.receipts, e.receipt()]).ok


def test_two_handles_in_one_process_share_the_chain(make_log: MakeLog) -> None:
    fx = make_log(1)
    a = AuditLog.open(fx.path, fx.key_path, fx.actor)
    b = AuditLog.open(fx.path, fx.key_path, fx.actor)
    a.append("x.a", run_id="r")
    b.append("x.b", run_id="r")  # b re-reads the tail written by a
    a.append("x.c", run_id="r")
    a.close()
    b.close()
    assert verify_log(fx.path).entries == 5


def test_threads_sharing_one_handle(make_log: MakeLog) -> None:
    fx = make_log(0)
    with AuditLog.open(fx.path, fx.key_path, fx.actor) as log:
        threads = [threading.Thread(target=fill_log, args=(log, 5, f"run-{i}")) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    r = verify_log(fx.path)
    assert r.ok and r.entries == 16


def test_append_fsyncs_the_line_before_returning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[tuple[int, int]] = []  # (fd, file size at fsync time)
    real_fsync = os.fsync
    dirs: list[Path] = []
    real_fsync_dir = log_module.fsync_dir

    def spy_fsync(fd: int) -> None:
        synced.append((fd, os.fstat(fd).st_size))
        real_fsync(fd)

    def spy_fsync_dir(d: Path) -> None:
        dirs.append(d)
        real_fsync_dir(d)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(log_module, "fsync_dir", spy_fsync_dir)
    path = tmp_path / "audit" / "site-1.jsonl"
    log = AuditLog.open(path, tmp_path / "site-1.pem", "site-1")
    assert dirs == [path.parent]  # the new file's directory entry is durable
    synced.clear()
    log.append("round.train", run_id="r", round=1)
    size = path.stat().st_size
    assert synced and synced[-1][1] == size  # the whole new line was synced before return
    log.close()
    dirs.clear()
    AuditLog.open(path, tmp_path / "site-1.pem", "site-1").close()
    assert dirs == []  # an existing file is not re-created


def test_reserved_and_invalid_appends_write_nothing(make_log: MakeLog) -> None:
    fx = make_log(1)
    before = fx.path.read_bytes()
    with AuditLog.open(fx.path, fx.key_path, fx.actor) as log:
        for action in ("log.created", "log.repaired", "checkpoint"):
            with pytest.raises(InvalidEntryError, match="reserved"):
                log.append(action, run_id="r")
        with pytest.raises(InvalidEntryError, match="details"):
            log.append("round.train", run_id="r", details={"rows": [[1.0, 2.0]]})
        with pytest.raises(InvalidEntryError, match="512"):
            log.append("round.train", run_id="r", details={"note": "x" * 600})
    assert fx.path.read_bytes() == before


def test_open_refuses_another_key_or_actor(make_log: MakeLog, tmp_path: Path) -> None:
    fx = make_log(1)
    with pytest.raises(LogStateError, match="created with another key"):
        AuditLog.open(fx.path, tmp_path / "other.pem", fx.actor)
    with pytest.raises(LogStateError, match="is the log of 'site-1'"):
        AuditLog.open(fx.path, fx.key_path, "site-2")
    with pytest.raises(InvalidEntryError, match="actor"):
        AuditLog.open(fx.path, fx.key_path, "Dr. Alice Smith")


def test_open_refuses_a_log_whose_last_entry_is_invalid(make_log: MakeLog) -> None:
    fx = make_log(2)
    lines = fx.lines()
    lines[-1] = lines[-1].replace(b'"round":1', b'"round":7')
    fx.write_lines(lines)
    with pytest.raises(LogStateError, match="fedmeta audit verify"):
        AuditLog.open(fx.path, fx.key_path, fx.actor)


def test_crash_mid_append_then_open_refuses_then_repair(
    make_log: MakeLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    fx = make_log(3)
    log = AuditLog.open(fx.path, fx.key_path, fx.actor)

    def torn_write(fd: int, data: bytes) -> None:  # half the line reaches the disk, then EIO
        os.write(fd, data[: len(data) // 2])
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(fs, "write_all", torn_write)
    monkeypatch.setattr(log_module, "write_all", torn_write)
    with pytest.raises(AuditWriteError, match="must not be performed"):
        log.append("round.train", run_id="run-1", round=9)
    monkeypatch.undo()
    with pytest.raises(AuditWriteError, match="earlier append"):
        log.append("round.train", run_id="run-1", round=9)  # fail closed from now on
    log.close()
    torn = fx.path.read_bytes()[sum(len(x) for x in fx.lines()[:4]) :]

    with pytest.raises(PartialTailError) as err:
        AuditLog.open(fx.path, fx.key_path, fx.actor)
    assert str(fx.path) in str(err.value) and "fedmeta audit verify" in str(err.value)
    r = verify_log(fx.path)
    assert r.partial_tail and not r.ok and r.entries == 4

    e = AuditLog.repair_partial_tail(fx.path, fx.key_path, fx.actor)
    side = fx.path.with_name(fx.path.name + ".partial")
    assert side.read_bytes() == torn  # moved, not deleted
    assert e.action == "log.repaired" and e.seq == 4
    assert e.details["partial_file"] == side.name and e.details["partial_bytes"] == len(torn)
    r = verify_log(fx.path, receipts=fx.receipts)
    assert r.ok and r.entries == 5
    with AuditLog.open(fx.path, fx.key_path, fx.actor) as log:
        assert log.append("round.train", run_id="run-1", round=9).seq == 5


def test_repair_of_unparsable_newline_terminated_tail(make_log: MakeLog) -> None:
    fx = make_log(1)
    with fx.path.open("ab") as f:
        f.write(b"\x00" * 30 + b"\n")  # e.g. zero-filled block after a power loss
    with pytest.raises(PartialTailError):
        AuditLog.open(fx.path, fx.key_path, fx.actor)
    AuditLog.repair_partial_tail(fx.path, fx.key_path, fx.actor)
    assert verify_log(fx.path).ok


def test_repair_of_a_log_torn_inside_its_first_entry(tmp_path: Path) -> None:
    path, key = tmp_path / "l.jsonl", tmp_path / "k.pem"
    AuditLog.open(path, key, "site-1").close()
    data = path.read_bytes()
    path.write_bytes(data[:40])
    AuditLog.repair_partial_tail(path, key, "site-1")
    r = verify_log(path, public_key=tmp_path / "k.pub.pem")
    assert r.ok and r.entries == 2


def test_repair_refuses_when_there_is_nothing_to_repair_or_other_damage(
    make_log: MakeLog,
) -> None:
    fx = make_log(3)
    with pytest.raises(AuditError, match="nothing to repair"):
        AuditLog.repair_partial_tail(fx.path, fx.key_path, fx.actor)
    lines = fx.lines()
    del lines[1]
    fx.write_lines([*lines, b'{"action":"ro'])  # a torn append after an earlier deletion
    before = fx.path.read_bytes()
    with pytest.raises(LogStateError, match="besides its incomplete tail"):
        AuditLog.repair_partial_tail(fx.path, fx.key_path, fx.actor)
    assert fx.path.read_bytes() == before
    assert not fx.path.with_name(fx.path.name + ".partial").exists()


def test_unopenable_log_path_is_an_audit_error(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("x")
    with pytest.raises(LogStateError, match="cannot open audit log"):
        AuditLog.open(tmp_path / "not-a-dir" / "log.jsonl", tmp_path / "k.pem", "site-1")


def test_closed_log_refuses_appends(make_log: MakeLog) -> None:
    fx = make_log(0)
    log = AuditLog.open(fx.path, fx.key_path, fx.actor)
    log.close()
    with pytest.raises(AuditError, match="closed"):
        log.append("x.y", run_id="r")
