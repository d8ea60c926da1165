"""The site's app approvals (fedmeta.deploy.appcheck): the store, the digests, the check.

Real FABs built by Flower's own builder from small app directories; real audit logs.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedmeta.audit import verify_log
from fedmeta.audit.keys import create_key
from fedmeta.deploy.appcheck import (
    AppApprovalError,
    approve,
    build_release_fab,
    check_fab,
    fab_sha256,
    normalize_hash,
    read_approvals,
    record_refusal,
    release_digest,
)
from fedmeta.paths import APP_APPROVALS as APPROVALS_FILE
from fedmeta.paths import SITE_AUDIT_KEY as AUDIT_KEY
from fedmeta.paths import SITE_AUDIT_LOG as AUDIT_LOG
from fedmeta.paths import SitePaths

PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tinyapp"
version = "1.0.0"
dependencies = ["flwr"]

[tool.flwr.app]
publisher = "test"

[tool.flwr.app.components]
serverapp = "server.app:app"
clientapp = "{clientapp}"

[tool.flwr.app.config]
rounds = {rounds}
"""


def make_app(
    root: Path,
    *,
    client: str = "x = 1\n",
    server: str = "y = 2\n",
    clientapp: str = "clients.app:app",
    rounds: int = 1,
    extra: dict[str, str] | None = None,
) -> bytes:
    """Write a small app under ``root`` and return its FAB (Flower's builder)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text(PYPROJECT.format(clientapp=clientapp, rounds=rounds))
    for name, text in {
        "clients/__init__.py": "",
        "clients/app.py": client,
        "server/__init__.py": "",
        "server/app.py": server,
        **(extra or {}),
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return build_fab_from_disk(root)


def test_flower_builds_the_same_fab_twice_and_its_hash_is_the_file_hash(tmp_path):
    a, b = make_app(tmp_path / "a"), make_app(tmp_path / "b")
    assert a == b  # deterministic: a site can rebuild the coordinator's FAB
    assert fab_sha256(a) == hashlib.sha256(a).hexdigest()


def test_the_release_fab_is_flowers_own_without_walking_what_flower_leaves_out(tmp_path):
    """``build_release_fab`` skips the directories Flower's publish rules drop (a source
    tree's .venv, .flwr, __pycache__): the FAB is byte for byte what ``flwr build`` makes,
    files that would be included elsewhere, symlinks and a .gitignore'd file included."""
    root = tmp_path / "app"
    skipped = {
        ".venv/lib/site-packages/pkg/mod.py": "a = 1\n",
        ".venv/pyvenv.cfg.toml": "x = 1\n",
        ".flwr/config.toml": "y = 1\n",
        "clients/__pycache__/app.py": "z = 1\n",
        "__pycache__/top.py": "w = 1\n",
    }
    kept = {
        "clients/venv/.venv/deep.py": "v = 1\n",  # only the app's own .venv is left out
        "fedmeta/data/rules.json": "{}",
        "ignored.py": "i = 1\n",
        ".gitignore": "ignored.py\n",
    }
    make_app(root, extra={**skipped, **kept})
    (root / "linked.py").symlink_to(root / "clients" / "app.py")
    (root / "outside").symlink_to(tmp_path, target_is_directory=True)
    fab = build_release_fab(root)
    assert fab == build_fab_from_disk(root)
    import zipfile

    names = set(zipfile.ZipFile(io.BytesIO(fab)).namelist())
    assert "clients/venv/.venv/deep.py" in names and "fedmeta/data/rules.json" in names
    assert not names & set(skipped) and "ignored.py" not in names


def test_release_digest_covers_what_runs_at_a_site_only(tmp_path):
    base = release_digest(make_app(tmp_path / "base"))
    # run settings, documents and the ServerApp do not run at a site
    assert release_digest(make_app(tmp_path / "cfg", rounds=7)) == base
    assert release_digest(make_app(tmp_path / "doc", extra={"README.md": "hi"})) == base
    assert release_digest(make_app(tmp_path / "run", extra={"run.toml": "a = 1"})) == base
    assert release_digest(make_app(tmp_path / "srv", server="import os\n")) == base
    # anything that can run at a site does
    for name, kwargs in {
        "client code": {"client": "x = 2\n"},
        "clientapp reference": {"clientapp": "clients.other:app"},
        "a module that shadows another": {"extra": {"torch.py": "raise SystemExit"}},
        "a new file in a site package": {"extra": {"clients/data/rules.json": "{}"}},
        "test-named code outside server/": {"extra": {"clients/helper.py": "z = 0"}},
    }.items():
        assert release_digest(make_app(tmp_path / name.replace(" ", "-"), **kwargs)) != base, name


def test_not_a_fab_is_a_one_line_error():
    with pytest.raises(AppApprovalError, match="not a readable Flower app bundle"):
        release_digest(b"PK\x03\x04 not really a zip")


@given(st.text(max_size=100))
def test_malformed_hash_input_is_refused_in_one_line(text):
    try:
        got = normalize_hash(text)
    except AppApprovalError as exc:
        assert "\n" not in str(exc) and "--fab-hash" in str(exc)
    else:  # only 64 hex digits (any case, optional sha256: prefix, whitespace) pass
        assert len(got) == 64 and set(got) <= set("0123456789abcdef")
        assert got in text.lower()


@given(st.binary(min_size=32, max_size=32))
def test_any_sha256_passes_in_any_case(raw):
    digest = raw.hex()
    assert normalize_hash(digest.upper()) == digest
    assert normalize_hash(f"  sha256:{digest}\n") == digest


def test_approvals_are_appended_once_and_read_back(tmp_path):
    fab = make_app(tmp_path / "app")
    assert approve(tmp_path, "fab_sha256", fab_sha256(fab).upper(), "test")
    assert not approve(tmp_path, "fab_sha256", fab_sha256(fab), "again")
    assert approve(tmp_path, "release_sha256", release_digest(fab), "release")
    got = read_approvals(tmp_path)
    assert [(a.kind, a.sha256) for a in got] == [
        ("fab_sha256", fab_sha256(fab)),
        ("release_sha256", release_digest(fab)),
    ]
    with pytest.raises(AppApprovalError, match="not a directory"):
        approve(tmp_path / "missing", "fab_sha256", fab_sha256(fab), "x")


@settings(max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    line=st.one_of(
        st.text(max_size=80),
        st.dictionaries(
            st.sampled_from(["fab_sha256", "release_sha256", "x"]),
            st.one_of(st.text(max_size=70), st.integers(), st.none()),
        ).map(json.dumps),
    )
)
def test_a_damaged_store_refuses_every_app(tmp_path, line):
    """Whatever a line of the store holds, the check never raises and never lets an app
    through on a line it cannot read."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    fab = (
        make_app(tmp_path / "app")
        if not (tmp_path / "fab").exists()
        else (tmp_path / "fab").read_bytes()
    )
    (tmp_path / "fab").write_bytes(fab)
    (site / APPROVALS_FILE).write_text(line + "\n")
    decision = check_fab(site, fab)
    try:
        approvals = read_approvals(site)
    except AppApprovalError as exc:
        assert not decision.approved and "approval store unusable" in decision.reason
        assert "\n" not in str(exc)
    else:
        assert decision.approved == any(
            a.sha256 in (fab_sha256(fab), release_digest(fab)) for a in approvals
        )


def test_the_check_passes_approved_apps_only(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    fab = make_app(tmp_path / "app")
    other = make_app(tmp_path / "other", client="import os\nos.system('id')\n")
    refused = check_fab(site, fab)
    assert not refused.approved and fab_sha256(fab) in refused.reason
    assert "fedmeta node approve-app" in refused.reason
    approve(site, "fab_sha256", fab_sha256(fab), "test")
    assert check_fab(site, fab, fab_sha256(fab)).approved
    assert not check_fab(site, other).approved
    # a FAB sent under another hash than its content's is refused even if approved
    lied = check_fab(site, fab, fab_sha256(other))
    assert not lied.approved and "not to the hash it was sent under" in lied.reason
    # the release digest admits a rebuilt app with other run settings, not other code
    approve(site, "release_sha256", release_digest(other), "release")
    assert check_fab(
        site, make_app(tmp_path / "other2", rounds=9, client="import os\nos.system('id')\n")
    ).approved
    assert not check_fab(site, make_app(tmp_path / "other3", client="pass\n")).approved


def test_a_refusal_is_signed_in_the_site_log(tmp_path):
    site = tmp_path / "site"
    create_key(site / AUDIT_KEY)
    fab = make_app(tmp_path / "app")
    decision = check_fab(site, fab)
    receipt = record_refusal(site, "site-a", "42", decision, "test/tinyapp", "1.0.0")
    assert receipt
    log = site / AUDIT_LOG
    assert verify_log(log, public_key=SitePaths(site).audit_pubkey).ok
    (entry,) = [json.loads(x) for x in log.read_text().splitlines() if '"app.refuse"' in x]
    assert entry["decision"] == "deny" and entry["rule_ids"] == ["SITE-APP"]
    assert entry["run_id"] == "42" and entry["details"]["fab_sha256"] == fab_sha256(fab)


def test_approve_app_command(tmp_path):
    from fedmeta.cli import app

    site = tmp_path / "site"
    create_key(site / AUDIT_KEY)
    fab = make_app(tmp_path / "app")
    (tmp_path / "app.fab").write_bytes(fab)
    runner = CliRunner()
    res = runner.invoke(app, ["node", "approve-app", str(site), "--fab-hash", "abc"])
    assert res.exit_code == 2 and "not a SHA-256" in res.output
    res = runner.invoke(app, ["node", "approve-app", str(site)])
    assert res.exit_code == 2 and "exactly one of" in res.output
    res = runner.invoke(app, ["node", "approve-app", str(site), "--fab", str(tmp_path / "app.fab")])
    assert res.exit_code == 0, res.output
    assert fab_sha256(fab) in res.output
    res = runner.invoke(
        app, ["node", "approve-app", str(site), "--release-dir", str(tmp_path / "app")]
    )
    assert res.exit_code == 0, res.output
    assert release_digest(fab) in res.output
    assert check_fab(site, fab).approved
    approvals = [
        json.loads(x) for x in (site / AUDIT_LOG).read_text().splitlines() if '"app.approve"' in x
    ]
    assert len(approvals) == 2  # each approval is signed in the site's log


def test_node_supernode_refuses_process_isolation():
    from fedmeta.deploy.supernode import isolation, main

    assert isolation(["--insecure"]) is None
    assert isolation(["--isolation", "process"]) == "process"
    assert isolation(["--isolation=subprocess"]) == "subprocess"
    assert main(["--insecure", "--isolation", "process"]) == 2
