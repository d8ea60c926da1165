"""`fedmeta run`: Flower's `flwr run --stream`, with progress and an exit code that tells."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedmeta.cli import app
from fedmeta.deploy.runner import END_MARKER, end_line, judge, progress_line

LINE = {
    "run": "r1",
    "round": 2,
    "used": ["site-a"],
    "declined": {"site-b": "SITE-POLICY.dp"},
    "lost": {"site-c": "error 5: Node Unavailable\nlater"},
    "dropped": {},
    "eval": {"metric": "accuracy", "adapted": 0.8125},
}


def test_progress_names_each_site_that_did_not_train_and_why():
    text = progress_line(LINE, 3)
    assert text == (
        "fedmeta: round 2/3: used 1, declined 1 (site-b: SITE-POLICY.dp), lost 1 "
        "(site-c: error 5: Node Unavailable later), adapted accuracy 0.812"
    )


@pytest.mark.parametrize(
    ("code", "end", "want"),
    [
        (0, {"run": "r", "rounds_used": 2, "stopped": None}, 0),
        (0, {"run": "r", "rounds_used": 0, "stopped": None}, 1),  # every site declined
        (0, {"run": "r", "rounds_used": 1, "stopped": "2 eligible site(s)"}, 1),
        (0, None, 1),  # failed, or flwr stop
        (3, None, 3),  # not started
    ],
)
def test_exit_code(code, end, want):
    assert judge(code, end).code == want


def fake_flwr(tmp: Path, body: str) -> dict[str, str]:
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "flwr").write_text(
        f'#!/bin/sh\necho "$@" > {tmp / "args"}\nenv > ' + str(tmp / "env") + "\n" + body
    )
    (bin_dir / "flwr").chmod(0o755)
    return {
        "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
        f"{os.environ['PATH']}"
    }


@pytest.mark.parametrize(
    ("summary", "rounds_used", "code", "says"),
    [
        ({"run": "r9", "rounds": 2, "stopped": None}, 2, 0, "finished"),
        ({"run": "r9", "rounds": 1, "stopped": None}, 0, 1, "refused"),
        ({"run": "r9", "rounds": 2, "stopped": "1 site connected"}, 1, 1, "stopped"),
        (None, 0, 1, "without fedmeta's end line"),
    ],
)
def test_fedmeta_run_wraps_flwr_run(tmp_path, monkeypatch, summary, rounds_used, code, says):
    end = end_line(summary, "/srv/runs/r9", rounds_used) if summary else ""
    body = (
        "echo 'Successfully started run 42'\n"
        f"echo {json.dumps(progress_line(LINE, 2))!r}\n"
        f"echo {end!r}\nexit 0\n"
    )
    for k, v in fake_flwr(tmp_path, body).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("FLWR_DISABLE_UPDATE_CHECK", raising=False)
    res = CliRunner().invoke(app, ["run", str(tmp_path), "fed", "--run-config", "run.toml"])
    assert res.exit_code == code, res.output
    assert says in res.output and "round 2/2" in res.output and END_MARKER not in res.output
    assert (tmp_path / "args").read_text().split() == [
        "run",
        str(tmp_path),
        "fed",
        "--stream",
        "--run-config",
        "run.toml",
    ]
    assert "FLWR_DISABLE_UPDATE_CHECK=1" in (tmp_path / "env").read_text()
