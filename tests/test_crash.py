"""A run killed midway leaves its audit logs and privacy ledgers intact and verifiable."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import FEDMETA, ROOT, fedmeta, loopback_only

from fedmeta.audit import verify_log
from fedmeta.privacy.ledger import LEDGER_FILE, PrivacyLedger

pytestmark = pytest.mark.slow


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def test_killed_run_keeps_verifiable_evidence_and_resumes(tmp_path):
    out = tmp_path / "run"
    args = ["simulate", "--sites", "3", "--rounds", "200", "--set", "fraction-train=1.0",
            "--set", "eval-every=0", "--set", "eval-episodes=3", "--out", str(out)]
    proc = subprocess.Popen([*loopback_only(), *FEDMETA, *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if sum(1 for x in lines if json.loads(x).get("used")) >= 3:
            break
        time.sleep(0.2)
    tree = descendants(proc.pid)
    for pid in tree:  # only what this test started
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert sum(1 for x in metrics.read_text().splitlines() if json.loads(x).get("used")) >= 3

    server = verify_log(out / "audit" / "server-audit-log.jsonl")
    assert server.ok or server.partial_tail, server.problem
    assert server.entries > 5
    for i in range(3):
        site_dir = out / "sites" / f"site-{i}"
        log = verify_log(site_dir / "audit" / "audit-log.jsonl")
        assert log.ok or log.partial_tail, log.problem
        ledger = PrivacyLedger.read(site_dir / LEDGER_FILE)
        assert len(ledger.charges) >= 2 and ledger.epsilon() > 0

    before = {i: len(PrivacyLedger.read(out / "sites" / f"site-{i}" / LEDGER_FILE).charges)
              for i in range(3)}
    res = fedmeta(*args[:4], "2", *args[5:], "--overwrite")
    if res.returncode != 0:  # a log cut mid-append must be repaired explicitly, never silently
        assert "audit" in res.stderr
        return
    for i in range(3):
        site_dir = out / "sites" / f"site-{i}"
        ledger = PrivacyLedger.read(site_dir / LEDGER_FILE)
        assert len(ledger.charges) == before[i] + 2  # the budget carries over
        assert verify_log(site_dir / "audit" / "audit-log.jsonl").ok
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2
