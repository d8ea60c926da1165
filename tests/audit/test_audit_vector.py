"""The test vector documented in fedmeta/audit/entry.py, and an independent verifier (openssl)."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmeta.audit import AuditLog, Entry, verify_log
from fedmeta.audit.keys import fingerprint, public_pem, public_raw_b64

SEED = bytes(range(32))
PUBLIC = "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="
BODY = (
    '{"action":"round.train","actor":"site-3","counts":{"examples":200},"decision":"allow",'
    '"details":{"dp":true,"noise_multiplier":1.1},"epsilon":0.5,"model_in":"' + "cd" * 32 + '",'
    '"model_out":null,"prev":"' + "ab" * 32 + '","round":2,"rule_ids":["GDPR-6"],'
    '"run_id":"run-1","seq":1,"time":"2026-01-02T03:04:05.000006Z"}'
).encode()
SIG = "hCNGyYbEJwFI7vLrGHkBOoMej5POzwbaf/BwFJTihPlm1lqYBzkI4B/BGkb/2mr83OFQIoAbFRRhWT2sOokfDA=="
HASH = "fbd8a63dbb222c3d4ece54ddb937cd2558e7b6d53bb64e24a394476f1c060d77"


def vector() -> Entry:
    return Entry.create(
        Ed25519PrivateKey.from_private_bytes(SEED),
        seq=1,
        prev="ab" * 32,
        actor="site-3",
        action="round.train",
        run_id="run-1",
        round=2,
        decision="allow",
        rule_ids=["GDPR-6"],
        counts={"examples": 200},
        model_in="cd" * 32,
        epsilon=0.5,
        details={"dp": True, "noise_multiplier": 1.1},
        time="2026-01-02T03:04:05.000006Z",
    )


def test_the_documented_vector() -> None:
    key = Ed25519PrivateKey.from_private_bytes(SEED)
    assert public_raw_b64(key) == PUBLIC
    e = vector()
    assert e.body_bytes() == BODY
    assert e.sig == SIG
    line = BODY.replace(b',"time"', f',"sig":"{SIG}","time"'.encode(), 1)
    assert e.line_bytes() == line and e.hash == HASH
    assert Entry.from_line(line) == e
    assert e.verify_signature(key.public_key())
    doc = Path(__import__("fedmeta.audit.entry", fromlist=["x"]).__file__).read_text()
    for text in (PUBLIC, HASH, SIG[:40]):  # the docstring shows the same vector
        assert text in doc


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl binary")
def test_openssl_verifies_an_entry_of_a_real_log(tmp_path: Path) -> None:
    log = AuditLog.open(tmp_path / "log.jsonl", tmp_path / "site-1.pem", "site-1")
    with log:
        entry = log.append(
            "round.train",
            run_id="run-1",
            round=1,
            decision="allow",
            counts={"examples": 10},
            epsilon=1.5,
            details={"dp": True},
        )
    assert verify_log(log.path).ok
    pub = tmp_path / "site-1.pub.pem"
    body, sig = tmp_path / "body.bin", tmp_path / "sig.bin"
    body.write_bytes(entry.body_bytes())
    sig.write_bytes(base64.b64decode(entry.sig))

    def openssl_verify(data: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "openssl",
                "pkeyutl",
                "-verify",
                "-pubin",
                "-inkey",
                str(pub),
                "-rawin",
                "-in",
                str(data),
                "-sigfile",
                str(sig),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )

    res = openssl_verify(body)
    if "rawin" in res.stderr and "unknown" in res.stderr.lower():
        pytest.skip("this openssl has no -rawin (needs OpenSSL 3)")
    assert res.returncode == 0 and "Signature Verified Successfully" in res.stdout, res.stderr
    bad = tmp_path / "bad.bin"
    bad.write_bytes(entry.body_bytes().replace(b'"examples":10', b'"examples":11'))
    assert openssl_verify(bad).returncode != 0
    # the vector's public key as PEM, for other tools
    vec = tmp_path / "vector.pub.pem"
    vec.write_bytes(public_pem(Ed25519PrivateKey.from_private_bytes(SEED)))
    body.write_bytes(BODY)
    sig.write_bytes(base64.b64decode(SIG))
    pub.write_bytes(vec.read_bytes())
    assert openssl_verify(body).returncode == 0
    assert fingerprint(Ed25519PrivateKey.from_private_bytes(SEED)).startswith("sha256:")
