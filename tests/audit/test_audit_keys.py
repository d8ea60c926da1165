"""Party keys: created 0600 without a chmod, public PEM beside them, unsafe modes refused."""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from fedmeta.audit import AuditLog, KeyFileError
from fedmeta.audit.keys import (
    create_key,
    fingerprint,
    load_or_create_key,
    load_private_key,
    load_public_key,
    public_key_path,
    public_pem,
)


@pytest.fixture(params=[0o000, 0o022, 0o077])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_created_key_is_0600_pkcs8_pem_with_public_pem_beside(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "keys" / "site-3.pem"
    key = create_key(path)
    assert mode(path) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    pub = tmp_path / "keys" / "site-3.pub.pem"
    assert public_key_path(path) == pub
    assert pub.read_bytes() == public_pem(key)
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert fingerprint(load_private_key(path)) == fingerprint(load_public_key(pub))
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_private_key_is_never_chmod_ed_and_opened_0600(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[tuple[str, int]] = []
    real_open = os.open

    def spy_open(path, flags, mode=0o777, *a, **kw):  # type: ignore[no-untyped-def]
        if flags & os.O_CREAT:
            opened.append((os.fspath(path), mode))
        return real_open(path, flags, mode, *a, **kw)

    def no_chmod(*a: object, **kw: object) -> None:
        raise AssertionError("chmod must not be used on key files")

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(os, "fchmod", no_chmod)
    create_key(tmp_path / "server.pem")
    private_creations = [m for p, m in opened if "server.pem" in p and ".pub" not in p]
    assert private_creations == [0o600]


def test_group_or_world_readable_private_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "site-1.pem"
    create_key(path)
    for bad in (0o644, 0o640, 0o604, 0o660):
        path.chmod(bad)
        with pytest.raises(KeyFileError, match=f"mode {bad:04o}.*chmod 600"):
            load_private_key(path)
        with pytest.raises(KeyFileError, match="0600"):
            AuditLog.open(tmp_path / "log.jsonl", path, "site-1")
    path.chmod(0o400)
    load_private_key(path)  # owner-only read is fine


def test_create_refuses_to_overwrite_and_load_or_create_reuses(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    k1 = load_or_create_key(path)
    before = path.read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        create_key(path)
    assert path.read_bytes() == before
    assert fingerprint(load_or_create_key(path)) == fingerprint(k1)


def test_missing_public_pem_is_restored_and_mismatch_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    key = create_key(path)
    pub = public_key_path(path)
    pub.unlink()
    load_or_create_key(path)
    assert pub.read_bytes() == public_pem(key)
    other = tmp_path / "other.pem"
    pub.write_bytes(public_pem(create_key(other)))
    with pytest.raises(KeyFileError, match="different public key"):
        load_or_create_key(path)


def test_bad_key_files(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        load_private_key(tmp_path / "none.pem")
    junk = tmp_path / "junk.pem"
    fd = os.open(junk, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key")
    os.close(fd)
    with pytest.raises(KeyFileError, match="not an unencrypted PEM"):
        load_private_key(junk)
    with pytest.raises(KeyFileError, match="neither a PEM"):
        load_public_key(b"not a key")


def test_public_key_forms(tmp_path: Path) -> None:
    key = create_key(tmp_path / "k.pem")
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    for src in (public_key_path(tmp_path / "k.pem"), public_pem(key), base64.b64encode(raw)):
        assert fingerprint(load_public_key(src)) == fingerprint(key)
