"""A site runs only code it approved: real SuperLink, a real site node, real `flwr run`s.

On 127.0.0.1, insecure (TLS is not what is tested here), in a temporary directory:
a SuperLink and one site node started as `start-node.sh --insecure` starts it
(`fedmeta node supernode`, so every ClientApp process goes through
fedmeta.deploy.lifeline and its app check). An app whose ClientApp writes a marker
file when it is imported and when it handles a message is sent twice: first to a site
that did not approve it (no marker, nothing installed, the coordinator gets an error
reply naming the hash, the site's signed log has ``app.refuse``), then after
`fedmeta node approve-app --fab` (it runs).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest
from deploy_helpers import BIN, Deployment, free_ports, wait_for
from flwr.cli.build import build_fab_from_disk

from fedmeta.audit import verify_log
from fedmeta.audit.keys import create_key
from fedmeta.deploy.appcheck import fab_sha256
from fedmeta.offline import OFFLINE_ENV
from fedmeta.paths import SITE_AUDIT_KEY as AUDIT_KEY
from fedmeta.paths import SITE_AUDIT_LOG as AUDIT_LOG
from fedmeta.paths import SitePaths

pytestmark = pytest.mark.deploy

CLIENT = """from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

Path({imported!r}).write_text("imported")  # importing the app is running it
app = ClientApp()


@app.query()
def query(msg, context):
    Path({ran!r}).write_text("ran")
    return Message(RecordDict({{"c": ConfigRecord({{"ok": 1}})}}), reply_to=msg)
"""

SERVER = """import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context):
    deadline = time.monotonic() + 60
    nodes = []
    while not nodes and time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    msgs = [Message(RecordDict({{"c": ConfigRecord({{"x": 1}})}}), dst_node_id=n,
                    message_type="query") for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=60))
    out = [{{"error": r.error.reason if r.has_error() else None,
             "code": r.error.code if r.has_error() else None}} for r in replies]
    Path({result!r}).write_text(json.dumps({{"run": context.run_id, "replies": out}}))
"""

PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "markerapp"
version = "1.0.0"
dependencies = ["flwr"]

[tool.flwr.app]
publisher = "test"

[tool.flwr.app.components]
serverapp = "markerapp.server_app:app"
clientapp = "markerapp.client_app:app"

[tool.flwr.app.config]
"""


def write_app(root: Path, marks: Path, result: Path) -> Path:
    pkg = root / "markerapp"
    pkg.mkdir(parents=True)
    (root / "pyproject.toml").write_text(PYPROJECT)
    (pkg / "__init__.py").write_text("")
    (pkg / "client_app.py").write_text(
        CLIENT.format(imported=str(marks / "imported"), ran=str(marks / "ran"))
    )
    (pkg / "server_app.py").write_text(SERVER.format(result=str(result)))
    return root


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def flwr_run(d: Deployment, app: Path, result: Path) -> dict:
    result.unlink(missing_ok=True)
    res = subprocess.run(
        [str(BIN / "flwr"), "run", str(app), "local"],
        env=d.offline,
        cwd=app,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    wait_for(result.exists, 90, f"the ServerApp's result ({d.logs})")
    return json.loads(result.read_text())


def test_an_unapproved_app_never_runs_at_the_site_and_an_approved_one_does(tmp_path):
    t0 = time.monotonic()
    d = Deployment(tmp_path)
    site = tmp_path / "site-a"
    create_key(site / AUDIT_KEY)
    marks = tmp_path / "marks"
    marks.mkdir()
    result = tmp_path / "result.json"
    app = write_app(tmp_path / "markerapp", marks, result)
    port, node_port = free_ports(2)
    d.flwr_home.mkdir()
    (d.flwr_home / "config.toml").write_text(
        f'[superlink.local]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    site_home = tmp_path / "site-flwr-home"
    try:
        d.start(
            "superlink",
            f"flower-superlink --insecure --host 127.0.0.1 --port {port} "
            f"--database {tmp_path / 'superlink.db'} "
            "--disable-runtime-dependency-installation",
            tmp_path,
            record=False,
            env={**OFFLINE_ENV, "FLWR_HOME": str(tmp_path / "superlink-flwr-home")},
        )
        wait_for(lambda: listening(port), 60, f"the SuperLink on port {port}")
        node_config = f'site-dir="{site}" site-id="site-a" site-index=0'
        d.start(
            "node",
            f"fedmeta node supernode --insecure --superlink 127.0.0.1:{port} "
            f"--host 127.0.0.1 --port {node_port} --node-config '{node_config}'",
            tmp_path,
            record=False,
            env={**OFFLINE_ENV, "FLWR_HOME": str(site_home)},
        )
        wait_for(
            lambda: any(n["status"] == "online" for n in d.flwr_nodes("local")),
            60,
            f"the site's node online ({d.logs})",
        )

        # 1. not approved: refused before anything of it is installed or imported
        refused = flwr_run(d, app, result)
        fab = build_fab_from_disk(app)  # what `flwr run` sent (Flower's builder)
        digest = fab_sha256(fab)
        (reply,) = refused["replies"]
        assert reply["error"] and "AppNotApproved" in reply["error"], reply
        assert digest in reply["error"] and "site-a" in reply["error"]
        assert not (marks / "imported").exists() and not (marks / "ran").exists()
        assert not list((site_home / "apps").glob("*markerapp*")), "the app was installed"
        log = site / AUDIT_LOG
        assert verify_log(log, public_key=SitePaths(site).audit_pubkey).ok
        entries = [json.loads(x) for x in log.read_text().splitlines()]
        (refusal,) = [e for e in entries if e["action"] == "app.refuse"]
        assert refusal["decision"] == "deny" and refusal["rule_ids"] == ["SITE-APP"]
        assert refusal["run_id"] == str(refused["run"])
        assert refusal["details"]["fab_sha256"] == digest

        # 2. approved by the site (the .fab the coordinator sent it): it runs
        (tmp_path / "markerapp.fab").write_bytes(fab)
        res = subprocess.run(
            [
                str(BIN / "fedmeta"),
                "node",
                "approve-app",
                str(site),
                "--fab",
                str(tmp_path / "markerapp.fab"),
            ],
            env=d.offline,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0 and digest in res.stdout, res.stdout + res.stderr
        ran = flwr_run(d, app, result)
        assert ran["replies"] == [{"error": None, "code": None}], (ran, d.log("node")[-3000:])
        assert (marks / "ran").read_text() == "ran"
        entries = [json.loads(x) for x in log.read_text().splitlines()]
        assert [e["action"] for e in entries if e["action"].startswith("app.")] == [
            "app.refuse",
            "app.approve",
        ]
        assert verify_log(log, public_key=SitePaths(site).audit_pubkey).ok
    finally:
        d.stop_all()
    assert not d.tagged_pids()
    assert time.monotonic() - t0 < 150
