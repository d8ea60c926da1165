"""`fedmeta audit ...` and `fedmeta keys ...` typer apps, through CliRunner."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path

from audit_helpers import LogFixture
from typer.testing import CliRunner

from fedmeta.audit import verify_log
from fedmeta.audit.cli import audit_app, keys_app
from fedmeta.audit.keys import load_private_key, public_pem

MakeLog = Callable[..., LogFixture]
runner = CliRunner()


def test_verify_good_log_exits_0_with_one_line(make_log: MakeLog) -> None:
    fx = make_log(3)
    args = ["verify", str(fx.path), "--public-key", str(fx.pub_path)]
    res = runner.invoke(audit_app, [*args, "--receipt", str(fx.receipts[-1])])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("OK ") and res.output.count("\n") == 1
    assert "4 entries" in res.output and "1/1 receipts match" in res.output


def test_verify_bad_log_exits_1_naming_first_bad_entry(make_log: MakeLog) -> None:
    fx = make_log(3)
    lines = fx.lines()
    del lines[2]
    fx.write_lines(lines)
    res = runner.invoke(audit_app, ["verify", str(fx.path)])
    assert res.exit_code == 1
    assert res.output.startswith("BAD ") and "entry 2 (line 3)" in res.output


def test_verify_truncation_against_receipt(make_log: MakeLog) -> None:
    fx = make_log(3)
    fx.write_lines(fx.lines()[:2])
    res = runner.invoke(audit_app, ["verify", str(fx.path), "--receipt", str(fx.receipts[-1])])
    assert res.exit_code == 1 and "truncated" in res.output


def test_verify_json(make_log: MakeLog) -> None:
    fx = make_log(2)
    res = runner.invoke(audit_app, ["verify", str(fx.path), "--json"])
    assert res.exit_code == 0
    data = json.loads(res.stdout)
    assert data["ok"] is True and data["entries"] == 3 and data["key_source"] == "embedded"
    assert data["head"] == str(fx.receipts[-1])


def test_verify_unreadable_input_exits_2(tmp_path: Path, make_log: MakeLog) -> None:
    missing = tmp_path / "nope.jsonl"
    res = runner.invoke(audit_app, ["verify", str(missing)])
    assert res.exit_code == 2 and str(missing) in res.output and res.output.count("\n") == 1
    fx = make_log(1)
    res = runner.invoke(audit_app, ["verify", str(fx.path), "--receipt", "12:nothex"])
    assert res.exit_code == 2 and "SEQ:HASH" in res.output
    res = runner.invoke(audit_app, ["verify", str(fx.path), "--public-key", str(missing)])
    assert res.exit_code == 2 and str(missing) in res.output


def test_repair_command(make_log: MakeLog) -> None:
    fx = make_log(2)
    with fx.path.open("ab") as f:
        f.write(b'{"action":')
    res = runner.invoke(audit_app, ["verify", str(fx.path)])
    assert res.exit_code == 1 and "incomplete last line" in res.output
    res = runner.invoke(audit_app, ["repair", str(fx.path), "--key", str(fx.key_path)])
    assert res.exit_code == 0, res.output
    assert "moved 10 bytes" in res.output
    assert verify_log(fx.path).ok
    res = runner.invoke(audit_app, ["repair", str(fx.path), "--key", str(fx.key_path)])
    assert res.exit_code == 1 and "nothing to repair" in res.output


def test_keys_create_and_show_public(tmp_path: Path) -> None:
    res = runner.invoke(keys_app, ["create", "site-3", "--dir", str(tmp_path / "keys")])
    assert res.exit_code == 0, res.output
    priv, pub = tmp_path / "keys" / "site-3.pem", tmp_path / "keys" / "site-3.pub.pem"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600 and pub.exists()
    assert "fingerprint sha256:" in res.output
    res = runner.invoke(keys_app, ["create", "site-3", "--dir", str(tmp_path / "keys")])
    assert res.exit_code == 1 and "already exists" in res.output
    res = runner.invoke(keys_app, ["show-public", str(priv)])
    assert res.exit_code == 0 and res.stdout.encode() == public_pem(load_private_key(priv))
    res = runner.invoke(keys_app, ["show-public", str(pub)])
    assert res.exit_code == 0 and res.stdout.encode() == pub.read_bytes()
    priv.chmod(0o644)
    res = runner.invoke(keys_app, ["show-public", str(priv)])
    assert res.exit_code == 1 and "chmod 600" in res.output
    res = runner.invoke(keys_app, ["create", "alice@example.org", "--dir", str(tmp_path)])
    assert res.exit_code == 2
