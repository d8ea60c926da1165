"""verify_log: a clean log passes; every tamper class is caught at the right entry."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from audit_helpers import LogFixture, forge
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmeta.audit import AuditLog, AuditReadError, Entry, KeyFileError, Receipt, verify_log
from fedmeta.audit.keys import load_private_key, public_pem, public_raw_b64

MakeLog = Callable[..., LogFixture]


def test_clean_log_verifies(make_log: MakeLog) -> None:
    fx = make_log(5)
    r = verify_log(fx.path)
    assert r.ok and r.problem is None and r.first_bad_seq is None and not r.partial_tail
    assert r.entries == 6  # log.created + 5
    assert r.head == fx.receipts[-1]
    assert r.key_source == "embedded" and r.actor == "site-1"
    pinned = verify_log(fx.path, public_key=fx.pub_path, receipts=fx.receipts)
    assert pinned.ok and pinned.key_source == "given"
    assert pinned.receipts_checked == [(rc, True) for rc in fx.receipts]
    assert verify_log(fx.path, public_key=fx.pub_path.read_bytes()).ok
    assert "OK" in pinned.summary() and "5/5 receipts match" in pinned.summary()


@pytest.mark.parametrize("seq", [0, 2, 5])
def test_edited_value_is_caught_at_that_entry(make_log: MakeLog, seq: int) -> None:
    fx = make_log(5)
    lines = fx.lines()
    lines[seq] = lines[seq].replace(b'"actor":"site-1"', b'"actor":"site-2"')
    fx.write_lines(lines)
    r = verify_log(fx.path)
    assert not r.ok and r.first_bad_seq == seq and r.entries == seq
    assert f"entry {seq} (line {seq + 1})" in (r.problem or "")


def test_edited_count_is_caught_by_signature(make_log: MakeLog) -> None:
    fx = make_log(5)
    lines = fx.lines()
    lines[3] = lines[3].replace(b'"excluded.consent":2', b'"excluded.consent":0')
    fx.write_lines(lines)
    r = verify_log(fx.path)
    assert (r.ok, r.first_bad_seq) == (False, 3)
    assert "signature" in (r.problem or "")


def test_whitespace_only_edit_is_caught(make_log: MakeLog) -> None:
    fx = make_log(3)
    lines = fx.lines()
    lines[2] = lines[2].replace(b'","', b'", "', 1)
    fx.write_lines(lines)
    r = verify_log(fx.path)
    assert (r.ok, r.first_bad_seq) == (False, 2)
    assert "canonical" in (r.problem or "")


@pytest.mark.parametrize("seq", [0, 2, 5])
def test_deleted_entry_is_caught(make_log: MakeLog, seq: int) -> None:
    fx = make_log(5)
    lines = fx.lines()
    del lines[seq]
    fx.write_lines(lines)
    r = verify_log(fx.path)
    if seq == 5:  # deleting the last entry is a truncation: only a receipt shows it
        assert r.ok
        r = verify_log(fx.path, receipts=[fx.receipts[-1]])
        assert "truncated" in (r.problem or "")
    else:
        assert "deleted, inserted or reordered" in (r.problem or "")
    assert (r.ok, r.first_bad_seq, r.entries) == (False, seq, seq)


def test_inserted_entry_is_caught(make_log: MakeLog) -> None:
    fx = make_log(5)
    lines = fx.lines()
    lines.insert(3, lines[2])  # a replayed copy
    fx.write_lines(lines)
    r = verify_log(fx.path)
    assert (r.ok, r.first_bad_seq) == (False, 3)


def test_inserted_forged_entry_with_right_seq_and_prev_is_caught(make_log: MakeLog) -> None:
    fx = make_log(5)
    entries = fx.entries()
    other = Ed25519PrivateKey.generate()
    forged = forge(entries[:3] + [entries[2]], other, 3)[0]  # seq 3, prev = hash(entry 2)
    lines = fx.lines()
    lines.insert(3, forged)
    fx.write_lines(lines)
    r = verify_log(fx.path)
    assert (r.ok, r.first_bad_seq) == (False, 3)
    assert "signature" in (r.problem or "")


def test_reordered_entries_are_caught(make_log: MakeLog) -> None:
    fx = make_log(5)
    lines = fx.lines()
    lines[2], lines[3] = lines[3], lines[2]
    fx.write_lines(lines)
    r = verify_log(fx.path)
    assert (r.ok, r.first_bad_seq) == (False, 2)


def test_truncation_is_caught_by_receipt_and_checkpoint(make_log: MakeLog) -> None:
    fx = make_log(5)
    with AuditLog.open(fx.path, fx.key_path, fx.actor) as log:
        cp = log.checkpoint("run-1", 5)
        assert cp.seq == 6 and log.head() == cp
        log.append("round.train", run_id="run-1", round=6)
    cp_entry = fx.entries()[6]
    assert cp_entry.action == "checkpoint"
    assert dict(cp_entry.details) == {"head_seq": 5, "head_hash": fx.receipts[-1].hash}
    assert verify_log(fx.path).last_checkpoint == cp
    fx.write_lines(fx.lines()[:4])  # roll back to entry 3
    assert verify_log(fx.path).ok  # a valid prefix on its own...
    r = verify_log(fx.path, receipts=[fx.receipts[0], cp])
    assert not r.ok and r.first_bad_seq == 4 and r.entries == 4
    assert r.receipts_checked == [(fx.receipts[0], True), (cp, False)]
    assert "names entry 6 but the log ends at entry 3" in (r.problem or "")


def test_rewritten_history_is_caught_by_receipt_hash(make_log: MakeLog) -> None:
    # the party itself (holding its key) rewrites entry 2 and re-chains the rest
    fx = make_log(5)
    entries = fx.entries()
    key = load_private_key(fx.key_path)
    lines = fx.lines()
    changed = lines[2].replace(b'"decision":"allow-with-exclusions"', b'"decision":"allow"')
    entries[2] = Entry.from_dict(json.loads(changed))
    lines[2:] = forge(entries, key, 2)
    fx.write_lines(lines)
    assert verify_log(fx.path, public_key=fx.pub_path).ok  # consistent on its own
    r = verify_log(fx.path, receipts=[fx.receipts[3]])
    assert (r.ok, r.first_bad_seq) == (False, 4)  # receipts[3] is entry 4
    assert "does not match receipt" in (r.problem or "")


def test_entries_resigned_with_another_key_are_caught(make_log: MakeLog) -> None:
    fx = make_log(5)
    other = Ed25519PrivateKey.generate()
    lines = fx.lines()
    lines[3:] = forge(fx.entries(), other, 3)
    fx.write_lines(lines)
    r = verify_log(fx.path)
    assert (r.ok, r.first_bad_seq) == (False, 3)
    assert "signature" in (r.problem or "")


def test_whole_log_resigned_with_another_key(make_log: MakeLog) -> None:
    fx = make_log(5)
    other = Ed25519PrivateKey.generate()
    entries = fx.entries()
    genesis = dict(entries[0].details)
    genesis["public_key"] = public_raw_b64(other)
    entries[0] = replace(entries[0], details=genesis)
    fx.write_lines(forge(entries, other, 0))
    tofu = verify_log(fx.path)
    assert tofu.ok and tofu.key_source == "embedded"  # trust on first use cannot know...
    pinned = verify_log(fx.path, public_key=fx.pub_path)
    assert (pinned.ok, pinned.first_bad_seq) == (False, 0)  # ...a pinned key does
    assert "not the given key" in (pinned.problem or "")
    assert not verify_log(fx.path, receipts=[fx.receipts[0]]).ok  # and so does a receipt


def test_wrong_public_key(make_log: MakeLog) -> None:
    fx = make_log(2)
    r = verify_log(fx.path, public_key=public_pem(Ed25519PrivateKey.generate()))
    assert (r.ok, r.first_bad_seq, r.entries) == (False, 0, 0)


@pytest.mark.parametrize("tail", [b'{"action":"round.tr', b"\x00" * 40, b"\x00" * 40 + b"\n"])
def test_partial_tail_verifies_up_to_last_complete_entry(make_log: MakeLog, tail: bytes) -> None:
    fx = make_log(4)
    with fx.path.open("ab") as f:
        f.write(tail)
    r = verify_log(fx.path, receipts=fx.receipts)
    assert not r.ok and r.partial_tail
    assert r.entries == 5 and r.head == fx.receipts[-1] and r.first_bad_seq == 5
    assert all(good for _, good in r.receipts_checked)
    assert "line 6" in (r.problem or "") and "repair" in (r.problem or "")


def test_problem_earlier_than_partial_tail_is_reported_first(make_log: MakeLog) -> None:
    fx = make_log(4)
    lines = fx.lines()
    del lines[1]
    fx.write_lines(lines + [b'{"action":"pol'])
    r = verify_log(fx.path)
    assert r.partial_tail and r.first_bad_seq == 1


def test_empty_and_garbage_files(tmp_path: Path) -> None:
    p = tmp_path / "log.jsonl"
    p.write_bytes(b"")
    r = verify_log(p)
    assert (r.ok, r.entries, r.first_bad_seq) == (False, 0, 0)
    p.write_bytes(b"hello\nworld\n")
    r = verify_log(p)
    assert (r.ok, r.first_bad_seq) == (False, 0)


def test_unreadable_inputs_raise(tmp_path: Path, make_log: MakeLog) -> None:
    with pytest.raises(AuditReadError, match="missing.jsonl"):
        verify_log(tmp_path / "missing.jsonl")
    fx = make_log(1)
    with pytest.raises(KeyFileError, match="nokey.pem"):
        verify_log(fx.path, public_key=tmp_path / "nokey.pem")


def test_receipt_objects_and_strings(make_log: MakeLog) -> None:
    fx = make_log(2)
    r = verify_log(fx.path, receipts=[Receipt.parse(str(fx.receipts[1]))])
    assert r.ok and r.receipts_checked == [(fx.receipts[1], True)]
