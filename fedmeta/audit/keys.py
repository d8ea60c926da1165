"""Ed25519 signing keys, one per party (the server and each site).

* Private key: PEM, PKCS#8, unencrypted, file mode 0600. It is written to a
  temporary file created with mode 0600 by ``os.open`` (never chmod-ed later),
  fsync-ed and then hard-linked into place, so a reader never sees a half
  written key and two processes creating the same key agree on one.
* Public key: PEM (SubjectPublicKeyInfo) next to it, ``<stem>.pub.pem``
  (``site-3.pem`` -> ``site-3.pub.pem``), mode 0644.
* Loading a private key whose file has any group or other permission bit set
  fails with :class:`KeyFileError`, like ssh does.

Protecting the key (disk encryption, HSM, backups) is the deployment's job;
the audit log only needs a key that no one else can use.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedmeta.audit._fs import fsync_dir, make_dirs, write_new_file
from fedmeta.audit.errors import KeyFileError

PRIVATE_KEY_MODE = 0o600
PUBLIC_KEY_MODE = 0o644


def public_key_path(private_key_path: Path) -> Path:
    """Where the public key of ``private_key_path`` lives: ``<stem>.pub.pem`` beside it."""
    p = Path(private_key_path)
    return p.with_name(p.stem + ".pub.pem")


def public_pem(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    """PEM (SubjectPublicKeyInfo) of the public half of ``key``."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_raw_b64(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The raw 32-byte public key, base64 (the form embedded in ``log.created``)."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def public_key_from_raw_b64(text: str) -> Ed25519PublicKey:
    """Inverse of :func:`public_raw_b64` (canonical base64 of exactly 32 bytes)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError) as e:
        raise KeyFileError(f"public key {text!r:.60} is not valid base64") from e
    if len(raw) != 32 or base64.b64encode(raw).decode("ascii") != text:
        raise KeyFileError("public key must be 32 bytes in canonical base64")
    return Ed25519PublicKey.from_public_bytes(raw)


def fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Id of a public key for out-of-band comparison: ``sha256:`` + the full 64 lowercase hex
    digits of the SHA-256 of its raw 32 bytes (never shortened: a prefix can be forged)."""
    raw = base64.b64decode(public_raw_b64(key))
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def grouped(fp: str) -> str:
    """A fingerprint for reading aloud: the same 64 digits in groups of 8."""
    hexpart = fp.removeprefix("sha256:")
    return "sha256:" + " ".join(hexpart[i : i + 8] for i in range(0, len(hexpart), 8))


def _write_public(private_path: Path, key: Ed25519PrivateKey) -> Path:
    """Write (or check) ``<stem>.pub.pem``; an existing file must hold the same key."""
    pub_path = public_key_path(private_path)
    pem = public_pem(key)
    if pub_path.exists():
        existing = load_public_key(pub_path)
        if public_raw_b64(existing) != public_raw_b64(key):
            raise KeyFileError(
                f"{pub_path} holds a different public key than {private_path}; "
                "move the stale file away and retry"
            )
        return pub_path
    tmp = pub_path.with_name(f".{pub_path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    write_new_file(tmp, pem, PUBLIC_KEY_MODE)
    os.replace(tmp, pub_path)
    fsync_dir(pub_path.parent)
    return pub_path


def create_key(path: Path) -> Ed25519PrivateKey:
    """Generate a new key at ``path`` (+ its ``.pub.pem``); fail if ``path`` exists."""
    path = Path(path)
    make_dirs(path.parent, mode=0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    write_new_file(tmp, pem, PRIVATE_KEY_MODE)
    try:
        os.link(tmp, path)  # atomic, and fails if another process created the key first
    except FileExistsError:
        raise KeyFileError(f"key file {path} already exists; refusing to overwrite it") from None
    finally:
        tmp.unlink()
    fsync_dir(path.parent)
    _write_public(path, key)
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load a party's private key, refusing files readable by group or others."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise KeyFileError(f"private key {path} does not exist") from None
    except OSError as e:
        raise KeyFileError(f"cannot open private key {path}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"private key {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise KeyFileError(
                f"private key {path} has mode {mode:04o}: it is accessible by group/others. "
                f"A private key must be mode 0600; check nobody copied it, then run "
                f"'chmod 600 {path}'"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read()
    finally:
        os.close(fd)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(
            f"private key {path} is not an unencrypted PEM PKCS#8 private key: {e}"
        ) from e
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"private key {path} is not an Ed25519 key")
    return key


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """Load the key at ``path``, creating it (and its ``.pub.pem``) on first use."""
    path = Path(path)
    if not path.exists():
        with contextlib.suppress(KeyFileError):
            return create_key(path)
        # another process won the race to create it; fall through and load theirs
    key = load_private_key(path)
    _write_public(path, key)
    return key


def load_public_key(source: Path | str | bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file, PEM bytes, or raw-key base64 bytes."""
    if isinstance(source, bytes):
        data, where = source, "given public key"
    else:
        where = str(source)
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise KeyFileError(f"cannot read public key {where}: {e.strerror or e}") from e
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError) as e:
            raise KeyFileError(f"{where} is not a PEM public key: {e}") from e
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"{where} is not an Ed25519 public key")
        return key
    try:
        return public_key_from_raw_b64(data.strip().decode("ascii"))
    except (UnicodeDecodeError, KeyFileError) as e:
        raise KeyFileError(
            f"{where} is neither a PEM public key nor a base64 raw Ed25519 key"
        ) from e
