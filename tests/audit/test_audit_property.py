"""Any single-byte change anywhere in a log file is detected (verify_log is not ok)."""

from __future__ import annotations

from pathlib import Path

import pytest
from audit_helpers import fill_log
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmeta.audit import AuditLog, verify_log


def _build(directory: Path, n: int) -> tuple[bytes, bytes]:
    log_path, key_path = directory / "site-1.jsonl", directory / "site-1.pem"
    with AuditLog.open(log_path, key_path, "site-1") as log:
        fill_log(log, n)
    return log_path.read_bytes(), key_path.with_name("site-1.pub.pem").read_bytes()


@pytest.fixture(scope="module")
def five(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, bytes]:
    d = tmp_path_factory.mktemp("five")
    return (d, *_build(d, 4))  # log.created + 4 entries


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, bytes]:
    d = tmp_path_factory.mktemp("three")
    return (d, *_build(d, 2))


def _detected(data: bytes, path: Path, pub: bytes | None) -> bool:
    path.write_bytes(data)
    r = verify_log(path, public_key=pub)
    return (not r.ok) and r.problem is not None and r.first_bad_seq is not None


def test_original_verifies(five: tuple[Path, bytes, bytes]) -> None:
    d, _, pub = five
    r = verify_log(d / "site-1.jsonl", public_key=pub)
    assert r.ok and r.entries == 5


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(where=st.floats(0, 1, exclude_max=True), byte=st.integers(0, 255), pin=st.booleans())
def test_any_single_byte_change_is_detected(
    five: tuple[Path, bytes, bytes], where: float, byte: int, pin: bool
) -> None:
    d, original, pub = five
    pos = int(where * len(original))
    if original[pos] == byte:
        byte ^= 0xFF
    data = original[:pos] + bytes([byte]) + original[pos + 1 :]
    assert _detected(data, d / "mutated.jsonl", pub if pin else None), (pos, byte)


def test_every_position_changed_is_detected(three: tuple[Path, bytes, bytes]) -> None:
    # exhaustive companion: one change at every byte position, verified with the
    # trust-on-first-use key (the weakest verifier: the forger may edit the embedded key too)
    d, original, _ = three
    path = d / "sweep.jsonl"
    for pos in range(len(original)):
        data = original[:pos] + bytes([original[pos] ^ 0x01]) + original[pos + 1 :]
        assert _detected(data, path, None), (pos, original[pos : pos + 1])


def test_deleting_or_inserting_a_byte_is_detected(three: tuple[Path, bytes, bytes]) -> None:
    d, original, _ = three
    path = d / "indel.jsonl"
    for pos in range(0, len(original), 11):
        assert _detected(original[:pos] + original[pos + 1 :], path, None), pos
        assert _detected(original[:pos] + b" " + original[pos:], path, None), pos
