"""Two processes appending to one log (same party) produce one valid chain."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from fedmeta.audit import AuditLog, read_log

N = 25


def _worker(path: str, key: str, worker: int, barrier: mp.synchronize.Barrier) -> None:
    barrier.wait(timeout=30)
    # both processes race to create the key and the log, then race for every append:
    # the barrier lets neither run ahead, so the two writers overlap throughout
    with AuditLog.open(Path(path), Path(key), "server") as log:
        for i in range(N):
            log.append("round.train", run_id="run-1", details={"worker": worker, "i": i})
            barrier.wait(timeout=30)


def test_concurrent_appends_from_two_processes(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    path, key = tmp_path / "audit" / "server.jsonl", tmp_path / "keys" / "server.pem"
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_worker, args=(str(path), str(key), w, barrier)) for w in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    entries, result = read_log(path, public_key=key.with_name("server.pub.pem"))
    assert result.ok, result.problem
    assert result.entries == 1 + 2 * N
    assert [e.action for e in entries].count("log.created") == 1
    for w in (0, 1):
        seen = [e.details["i"] for e in entries[1:] if e.details["worker"] == w]
        assert seen == list(range(N))
    # interleaved: every pair of consecutive appends holds one entry of each writer
    for k in range(N):
        pair = entries[1 + 2 * k : 3 + 2 * k]
        assert {(e.details["worker"], e.details["i"]) for e in pair} == {(0, k), (1, k)}
