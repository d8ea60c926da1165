"""`fedmeta simulate` prints fedmeta's own lines only, each once; --verbose adds Flower's."""

from __future__ import annotations

import logging
import re

import pytest
from helpers import fedmeta

from fedmeta import logs
from fedmeta.logs import configure

ARGS = [
    "simulate",
    "--backend",
    "inline",
    "--task",
    "digits-fewshot",
    "--sites",
    "2",
    "--rounds",
    "2",
    "--set",
    "eval-episodes=3",
    "--set",
    "eval-every=1",
]
FLOWER_MARKS = re.compile(r"\b(DEBUG|INFO|WARNING|DEPRECATED|ERROR)\b")


def test_default_output_is_fedmetas_progress_table_and_result_only(tmp_path):
    res = fedmeta(*ARGS, "--out", str(tmp_path / "run"), isolate=False)
    assert res.returncode == 0, res.stderr[-3000:]
    # DP on: only fedmeta's note that simulated noise is seeded; nothing of Flower's
    err = " ".join(res.stderr.split())
    assert re.sub(r"note: DP noise is seeded .*? use their own CSPRNG", "", err).strip() == ""
    assert err.count("note: DP noise is seeded") == 1
    lines = [x for x in res.stdout.splitlines() if x.strip()]
    assert not [x for x in lines if FLOWER_MARKS.search(x)], res.stdout
    assert "Secure RNG" not in res.stdout
    duplicated = {x for x in lines if lines.count(x) > 1}
    assert not duplicated, duplicated
    assert lines[0].startswith("reptile on digits-fewshot") and "2/2" in lines[0]
    assert re.search(r"^\s*run \S+ \(reptile on", res.stdout, re.M)
    assert sum("│ site-" in x for x in lines) == 2
    assert any("accuracy on held-out data: adapted" in x for x in lines)
    assert lines[-1].startswith("run directory: ")
    assert len(lines) <= 14, res.stdout


def test_verbose_shows_flowers_info_once(tmp_path):
    res = fedmeta(*ARGS, "--verbose", "--out", str(tmp_path / "run"), isolate=False)
    assert res.returncode == 0, res.stderr[-3000:]
    starts = [x for x in res.stderr.splitlines() if "Starting Reptile strategy" in x]
    assert len(starts) == 1 and "INFO" in starts[0]
    assert sum(bool(re.search(r"\[ROUND 1/2\]", x)) for x in res.stderr.splitlines()) == 1
    assert "DEBUG" not in res.stderr
    # fedmeta's own INFO lines, from its module loggers (the server's round summary)
    assert sum(x.startswith("round 1: used 2") for x in res.stderr.splitlines()) == 1


@pytest.fixture
def restored_logging(monkeypatch):
    """configure() changes process-wide logging: put it back afterwards."""
    names = ("flwr", *logs.FEDMETA_LOGGERS)
    saved = {
        n: (
            logging.getLogger(n).level,
            logging.getLogger(n).propagate,
            list(logging.getLogger(n).handlers),
        )
        for n in names
    }
    monkeypatch.setattr(logs, "_configured", False)
    yield
    for name, (level, propagate, handlers) in saved.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.propagate = propagate
        logger.handlers[:] = handlers


def test_configure_keeps_records_off_the_root_logger(capsys, restored_logging):
    root = logging.getLogger()
    handler = logging.StreamHandler()  # what Opacus's logging.basicConfig adds
    root.addHandler(handler)
    try:
        configure(verbose=False)
        logging.getLogger("flwr").warning("a Flower deprecation")
        logging.getLogger("server.run").warning("a fedmeta warning")
        logging.getLogger("server.run").info("a fedmeta detail")
        assert logs.configured()
        err = capsys.readouterr().err
        assert "a Flower deprecation" not in err
        assert err.count("a fedmeta warning") == 1 and "warning: a fedmeta warning" in err
        assert "a fedmeta detail" not in err
        configure(verbose=True)
        configure(verbose=True)  # idempotent: one handler, one line
        logging.getLogger("server.run").info("a fedmeta detail")
        assert capsys.readouterr().err.count("a fedmeta detail") == 1
    finally:
        root.removeHandler(handler)
