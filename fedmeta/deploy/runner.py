"""``fedmeta run APP FEDERATION --run-config FILE``: ``flwr run --stream`` with an honest ending.

Flower's ``flwr run --stream`` shows the ServerApp's output and then exits 0 whatever
happened to the run. This wrapper runs exactly that command (with Flower's update check
and telemetry off), echoes its output, and ends with what the run did:

* per-round progress comes from the ServerApp itself: in a deployment it prints one
  ``fedmeta: round R/N: ...`` line per round (sites used, declined, lost and why) and a
  last line :data:`END_MARKER` followed by a JSON object (fedmeta run id, its out-dir,
  rounds with at least one site used, why it stopped early if it did);
* exit 0 when the run finished and trained in every round it ran; 1 when it was refused
  (no round used any site, e.g. every site declined), stopped early (fewer sites than the
  declared minimum), or ended without the end line (it failed or was stopped with ``flwr
  stop``); Flower's own non-zero exit (the run could not be started) is passed on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmeta.offline import OFFLINE_ENV

END_MARKER = "FEDMETA-RUN-END"
PROGRESS_PREFIX = "fedmeta: "


def progress_line(line: dict[str, Any], rounds: int) -> str:
    """The ServerApp's one-line progress report of a round (a metrics line)."""
    parts = [f"used {len(line.get('used') or [])}"]
    for key in ("declined", "lost", "dropped"):
        items = line.get(key) or {}
        if items:
            why = "; ".join(
                f"{s}: {' '.join(str(r).split())[:120]}" for s, r in sorted(items.items())
            )
            parts.append(f"{key} {len(items)} ({why})")
    ev = line.get("eval") or {}
    if ev.get("adapted") is not None:
        parts.append(f"adapted {ev.get('metric', 'metric')} {ev['adapted']:.3f}")
    return f"{PROGRESS_PREFIX}round {line['round']}/{rounds}: " + ", ".join(parts)


def end_line(summary: dict[str, Any], out_dir: str, rounds_used: int) -> str:
    return (
        END_MARKER
        + " "
        + json.dumps(
            {
                "run": summary.get("run"),
                "out_dir": out_dir,
                "rounds_used": rounds_used,
                "rounds": summary.get("rounds"),
                "stopped": summary.get("stopped"),
            },
            sort_keys=True,
        )
    )


@dataclass
class Outcome:
    code: int
    message: str
    end: dict[str, Any] | None


def judge(flwr_code: int, end: dict[str, Any] | None) -> Outcome:
    """Exit code and one line from Flower's exit code and the ServerApp's end line."""
    if flwr_code != 0:
        return Outcome(flwr_code, f"flwr run exited {flwr_code}: the run was not started", end)
    if end is None:
        return Outcome(
            1,
            "the run ended without fedmeta's end line: it failed or was stopped "
            "(flwr stop); see the output above",
            None,
        )
    where = f" (out-dir {end.get('out_dir')})"
    if not end.get("rounds_used"):
        why = end.get("stopped") or "every site declined or was lost"
        return Outcome(
            1, f"run {end.get('run')} refused: no round used any site ({why}){where}", end
        )
    if end.get("stopped"):
        return Outcome(1, f"run {end.get('run')} stopped: {end['stopped']}{where}", end)
    return Outcome(
        0, f"run {end.get('run')} finished: {end['rounds_used']} round(s) with sites{where}", end
    )


def run(
    app: Path,
    federation: str,
    run_config: str | None,
    echo: Callable[[str], None] = lambda s: print(s, flush=True),
) -> Outcome:
    """Run ``flwr run APP FEDERATION --stream [--run-config ...]``, echoing its output."""
    cmd = ["flwr", "run", str(app), federation, "--stream"]
    if run_config:
        cmd += ["--run-config", run_config]
    env = {**os.environ, **OFFLINE_ENV}
    end: dict[str, Any] | None = None
    try:
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
    except FileNotFoundError:
        return Outcome(2, "flwr: not found; install fedmeta's constraints (Flower) first", None)
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.rstrip("\n")
        at = line.find(END_MARKER + " ")
        if at >= 0:
            try:
                end = json.loads(line[at + len(END_MARKER) + 1 :])
            except json.JSONDecodeError:
                end = None
            continue
        echo(line)
    code = proc.wait()
    return judge(code, end)


def main(app: Path, federation: str, run_config: str | None) -> int:
    outcome = run(app, federation, run_config)
    print(
        ("" if outcome.code == 0 else "error: ") + outcome.message,
        file=sys.stderr if outcome.code else sys.stdout,
        flush=True,
    )
    return outcome.code
