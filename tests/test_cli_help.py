"""The command line explains itself: choices come from the registries, defaults are
shown, every command and parameter has a whole help text, a wrong value is one line."""

from __future__ import annotations

import os
import subprocess
import sys

import click
import pytest
import typer
from typer.testing import CliRunner

from fedmeta.cli import app
from fedmeta.config import BACKENDS, choices, default
from fedmeta.data.task_names import BUNDLED_TASKS, task_names
from fedmeta.report.render import FORMATS

WIDE = {"COLUMNS": "400", "NO_COLOR": "1"}


def help_of(*args: str) -> str:
    res = CliRunner().invoke(app, [*args, "--help"], env=WIDE)
    assert res.exit_code == 0, res.output
    return res.output


def test_simulate_lists_the_registries_and_the_defaults():
    text = help_of("simulate")
    assert " | ".join(task_names()) in text and "tabular-csv" in text
    assert " | ".join(choices("strategy")) in text
    assert " | ".join(BACKENDS) in text
    for key in ("task", "strategy", "sites", "rounds", "seed", "device"):
        assert f"[default: ({default(key)})]" in text, key
    assert "fedmeta config" in text  # where the --set keys are listed


def test_report_lists_its_formats():
    assert f"report format: {' | '.join(FORMATS)} [default: html]" in help_of("report")


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["simulate", "--strategy", "fedprox"], "choose one of reptile | fedavg | fomaml"),
        (["simulate", "--backend", "threads"], "choose one of ray | inline"),
        (["simulate", "--task", "digits-fewshoot"], "(did you mean digits-fewshot?)"),
        # the task list is read when the test runs: another test may install a plug-in
        (["simulate", "--task", "mnist"], None),
        (["report", "run", "--format", "pdf"], "choose one of html | json | md"),
    ],
)
def test_a_wrong_value_is_one_line_naming_the_choices(tmp_path, args, names):
    names = names or " | ".join(task_names()) + " or package.module:Class"
    res = CliRunner().invoke(
        app, [*args, "--out", str(tmp_path / "x")] if args[0] == "simulate" else args, env=WIDE
    )
    assert res.exit_code == 2, res.output
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith(f"error: option '{args[-2]}': unknown ") and names in res.stderr
    assert not (tmp_path / "x").exists()


def _commands() -> list[tuple[str, click.Command]]:
    out = []

    def walk(cmd: click.Command, path: list[str]) -> None:
        out.append((" ".join(path) or "fedmeta", cmd))
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return out


def test_every_command_and_parameter_has_a_whole_help_text():
    missing, cut = [], []
    for name, cmd in _commands():
        summary = (cmd.help or "").split("\n\n")[0].strip()
        if not summary.endswith((".", ")")):
            cut.append(name)
        missing += [
            f"{name} {p.name}"
            for p in cmd.params
            if p.name != "help" and not getattr(p, "help", None)
        ]
    assert missing == [] and cut == []


def test_argument_help_is_shown():
    assert "run directories (one per strategy" in help_of("evaluate")


def test_an_installed_plug_in_is_listed_and_named_in_errors(tmp_path):
    dist = tmp_path / "fedmeta_test_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fedmeta-test-plugin\nVersion: 0.1\n"
    )
    (dist / "entry_points.txt").write_text("[fedmeta.tasks]\nzebra-task = zebra_mod:Zebra\n")
    env = {**os.environ, **WIDE, "PYTHONPATH": str(tmp_path)}
    shown = subprocess.run(
        [sys.executable, "-m", "fedmeta.cli", "simulate", "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    listed = " ".join(shown.stdout.split())
    # bundled first, then every installed plug-in (other plug-ins may be installed too)
    assert " | ".join(BUNDLED_TASKS) + " |" in listed and "zebra-task" in listed
    assert listed.index("zebra-task") > listed.index(list(BUNDLED_TASKS)[-1])
    wrong = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedmeta.cli",
            "simulate",
            "--task",
            "zebra-tsk",
            "--out",
            str(tmp_path / "x"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert wrong.returncode == 2
    assert "zebra-task" in wrong.stderr and "did you mean zebra-task?" in wrong.stderr
