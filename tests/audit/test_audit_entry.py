"""Entry validation, canonical form and receipts."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmeta.audit import Entry, InvalidEntryError, Receipt, ReceiptFormatError
from fedmeta.audit.entry import GENESIS_PREV, MAX_STR, canonical, sha256_hex

KEY = Ed25519PrivateKey.generate()


def make(**kw: object) -> Entry:
    args: dict[str, object] = dict(seq=0, prev=GENESIS_PREV, actor="site-1", action="round.train")
    args["run_id"] = "r1"
    args.update(kw)
    return Entry.create(KEY, **args)  # type: ignore[arg-type]


def test_line_is_canonical_json_and_hash_is_sha256_of_line() -> None:
    e = make(details={"b": 1, "a": "x"}, epsilon=1, counts={"z": 1, "a": 2})
    line = e.line_bytes()
    obj = json.loads(line)
    assert (
        line == json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    )
    assert list(obj) == sorted(obj)
    assert obj["epsilon"] == 1.0 and isinstance(obj["epsilon"], float)
    assert e.hash == sha256_hex(line)
    assert e.body_bytes() == canonical({k: v for k, v in obj.items() if k != "sig"})
    assert e.verify_signature(KEY.public_key())
    assert Entry.from_line(line) == e
    assert str(e.receipt()) == f"0:{e.hash}"


def test_non_canonical_spelling_of_same_content_is_rejected() -> None:
    line = make(epsilon=0.5).line_bytes()
    obj = json.loads(line)
    for variant in (
        json.dumps(obj, sort_keys=True).encode(),  # spaces after separators
        json.dumps(dict(reversed(obj.items())), separators=(",", ":")).encode(),  # key order
        line.replace(b'"epsilon":0.5', b'"epsilon":5e-1'),  # number spelling
        line.replace(b'"actor":"site-1"', b'"actor":"site\\u002d1"'),  # escape
    ):
        assert json.loads(variant) == obj
        with pytest.raises(InvalidEntryError, match="canonical"):
            Entry.from_line(variant)


def test_non_canonical_base64_signature_is_rejected() -> None:
    e = make()
    # the last base64 char before '==' carries 4 unused bits: flipping one decodes to the
    # same signature, so only the canonical-form check can notice
    sig = e.sig
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    twin = sig[:85] + alphabet[alphabet.index(sig[85]) ^ 1] + "=="
    line = e.line_bytes().replace(sig.encode(), twin.encode())
    with pytest.raises(InvalidEntryError, match="sig"):
        Entry.from_line(line)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"details": {"rows": [1, 2]}}, "no lists, dicts or raw data"),
        ({"details": {"x": {"a": 1}}}, "no lists, dicts or raw data"),
        ({"details": {"x": b"raw"}}, "no lists, dicts or raw data"),
        ({"details": {"x": "a" * (MAX_STR + 1)}}, "exceeds the cap of 512"),
        ({"details": {"x": "two\nlines"}}, "control characters"),
        ({"details": {"x": float("nan")}}, "finite"),
        ({"details": {f"k{i}": i for i in range(33)}}, "cap of 32"),
        ({"details": {"bad key": 1}}, "details key"),
        ({"rule_ids": "G01"}, "not a single string"),
        ({"counts": {"x": -1}}, "int >= 0"),
        ({"counts": {"x": True}}, "int >= 0"),
        ({"decision": "maybe"}, "decision"),
        ({"model_in": "ABC"}, "sha256"),
        ({"epsilon": -0.1}, ">= 0"),
        ({"epsilon": float("inf")}, "finite"),
        ({"round": -1}, "round"),
        ({"actor": "alice@hospital.example"}, "actor"),
        ({"action": "Round Train"}, "action"),
        ({"run_id": ""}, "run_id"),
    ],
)
def test_invalid_values_are_rejected_with_a_clear_error(kw: dict, match: str) -> None:
    with pytest.raises(InvalidEntryError, match=match):
        make(**kw)


def test_unknown_and_missing_fields_are_rejected() -> None:
    obj = json.loads(make().line_bytes())
    with pytest.raises(InvalidEntryError, match="unknown fields"):
        Entry.from_dict({**obj, "patient": "x"})
    del obj["round"]
    with pytest.raises(InvalidEntryError, match="missing fields"):
        Entry.from_dict(obj)


def test_receipt_roundtrip_and_errors() -> None:
    h = "ab" * 32
    r = Receipt(7, h)
    assert str(r) == f"7:{h}"
    assert Receipt.parse(str(r)) == r
    assert Receipt.parse(f" 7:{h.upper()} \n") == r
    for bad in ("", "7", f"-1:{h}", f"07:{h}", f"7:{h[:-1]}", f"x:{h}", f"7:{h}:1", f"7;{h}"):
        with pytest.raises(ReceiptFormatError, match="SEQ:HASH"):
            Receipt.parse(bad)
    with pytest.raises(ValueError):  # ReceiptFormatError is a ValueError too
        Receipt(-1, h)
