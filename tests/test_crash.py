"""A run killed midway leaves its audit logs and privacy ledgers intact and verifiable,
and the next run in the same directory starts from them (in-process backend: one
process to kill, holding the server and every site)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import FEDMETA, ROOT, fedmeta

from fedmeta.audit import verify_log
from fedmeta.paths import LEDGER_FILE, RunPaths, SitePaths
from fedmeta.privacy.ledger import PrivacyLedger

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


def repair_if_cut(log: Path, key: Path) -> bool:
    """A log cut mid-append is repaired explicitly (``fedmeta audit repair``), never
    silently; returns whether it had to be."""
    if not verify_log(log).partial_tail:
        return False
    res = fedmeta("audit", "repair", str(log), "--key", str(key), isolate=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert verify_log(log).ok
    return True


def test_killed_run_keeps_verifiable_evidence_and_resumes(tmp_path):
    out = tmp_path / "run"
    args = [
        "simulate",
        "--backend",
        "inline",
        "--sites",
        "3",
        "--rounds",
        "200",
        "--set",
        "fraction-train=1.0",
        "--set",
        "eval-every=0",
        "--set",
        "eval-episodes=3",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(
        [*FEDMETA, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    metrics = RunPaths(out).metrics
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if sum(1 for x in lines if json.loads(x).get("used")) >= 3:
            break
        time.sleep(0.05)
    tree = descendants(proc.pid)
    for pid in tree:  # only what this test started
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL  # killed mid-run, not finished
    first = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert sum(1 for x in first if x.get("used")) >= 3
    killed_run = first[0]["run"]

    server_log = RunPaths(out).server_log
    server = verify_log(server_log)
    assert server.ok or server.partial_tail, server.problem
    assert server.entries > 5
    before = {}
    for i in range(3):
        site_dir = RunPaths(out).site(f"site-{i}").root
        log = verify_log(SitePaths(site_dir).audit_log)
        assert log.ok or log.partial_tail, log.problem
        ledger = PrivacyLedger.read(site_dir / LEDGER_FILE)
        assert len(ledger.charges) >= 2 and ledger.epsilon() > 0
        before[i] = (len(ledger.charges), ledger.epsilon())
        repair_if_cut(SitePaths(site_dir).audit_log, SitePaths(site_dir).audit_key)
    repair_if_cut(server_log, RunPaths(out).server_key)

    # the same run directory again, 2 rounds: it must start, and carry the budget over
    res = fedmeta(*args[:6], "2", *args[7:], "--overwrite", isolate=False)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(RunPaths(out).summary.read_text())
    assert summary["rounds"] == 2 and summary["run"] != killed_run
    new_run = summary["run"]
    assert [json.loads(x)["round"] for x in metrics.read_text().splitlines()] == [0, 1, 2]
    for i in range(3):
        site_dir = RunPaths(out).site(f"site-{i}").root
        ledger = PrivacyLedger.read(site_dir / LEDGER_FILE)
        assert len(ledger.charges) == before[i][0] + 2  # the budget carries over
        assert ledger.epsilon() > before[i][1]
        assert summary["epsilon"][f"site-{i}"] == pytest.approx(ledger.epsilon())
        site_log = SitePaths(site_dir).audit_log
        assert verify_log(site_log).ok
        trained = [
            e
            for e in map(json.loads, site_log.read_text().splitlines())
            if e["action"] == "round.train"
        ]
        assert {e["run_id"] for e in trained} == {killed_run, new_run}
        assert [e["round"] for e in trained if e["run_id"] == new_run] == [1, 2]
    assert verify_log(server_log).ok
    actions = [
        (e["run_id"], e["action"]) for e in map(json.loads, server_log.read_text().splitlines())
    ]
    assert (killed_run, "run.start") in actions and (killed_run, "run.end") not in actions
    assert (new_run, "run.start") in actions and (new_run, "run.end") in actions
