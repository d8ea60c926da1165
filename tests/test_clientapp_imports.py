"""A deployed node starts a ClientApp process per message: only a training round imports
torch and Opacus (seconds each time); the queries (who the site is, the run's end) do not."""

from __future__ import annotations

import subprocess
import sys

from helpers import ROOT, example_site_on_bundled_data

from fedmeta.paths import SitePaths

PROBE = """
import json, sys
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.app import app

TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
context = Context(
    run_id=1,
    node_id=1,
    node_config={"site-dir": sys.argv[1], "site-id": "site-de-01"},
    state=RecordDict(),
    run_config={},
)
query = Message(
    RecordDict({"config": ConfigRecord({"server-round": 0})}),
    dst_node_id=1,
    message_type=MessageType.QUERY,
)
reply = app(query, context)
assert not reply.has_error(), reply.error
site = reply.content["site"]
country = json.loads(str(site["manifest-json"]))["country"]
print(site["site-id"], country, sorted(m for m in ("torch", "opacus") if m in sys.modules))
"""


def test_a_clientapp_answers_a_query_without_importing_torch_or_opacus(tmp_path):
    site_dir = tmp_path / "site-de-01"
    site_dir.mkdir()
    SitePaths(site_dir).manifest.write_text(example_site_on_bundled_data())
    res = subprocess.run(
        [sys.executable, "-c", PROBE, str(site_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split("\n")[0] == "site-de-01 DE []", res.stdout + res.stderr[-2000:]
