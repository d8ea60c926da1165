"""``FEDMETA_HEARTBEAT_INTERVAL_S``: the heartbeat interval a site's node declares."""

from __future__ import annotations

import importlib

import pytest

from fedmeta.deploy import supernode
from fedmeta.deploy.supernode import HEARTBEAT_ENV, LauncherError, set_heartbeat_interval

MODULES = [importlib.import_module(m) for m in supernode._HEARTBEAT_MODULES]


@pytest.fixture(autouse=True)
def restore_flower(monkeypatch):
    for module in MODULES:  # undone after each test: Flower's own value again
        monkeypatch.setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", module.HEARTBEAT_DEFAULT_INTERVAL)


def test_the_interval_reaches_both_of_flowers_readers():
    set_heartbeat_interval("12.5")
    assert [m.HEARTBEAT_DEFAULT_INTERVAL for m in MODULES] == [12.5, 12.5]


def test_unset_or_empty_keeps_flowers_default():
    before = [m.HEARTBEAT_DEFAULT_INTERVAL for m in MODULES]
    set_heartbeat_interval(None)
    set_heartbeat_interval(" ")
    assert [m.HEARTBEAT_DEFAULT_INTERVAL for m in MODULES] == before == [30, 30]


@pytest.mark.parametrize("value", ["5", "9.99", "1801", "soon", "nan", "-10"])
def test_an_interval_the_superlink_refuses_is_one_line(value):
    with pytest.raises(LauncherError, match=f"{HEARTBEAT_ENV}=.*between 10 and 1800") as err:
        set_heartbeat_interval(value)
    assert "\n" not in str(err.value)
    assert [m.HEARTBEAT_DEFAULT_INTERVAL for m in MODULES] == [30, 30]


def test_the_launcher_refuses_to_start_with_a_bad_interval(monkeypatch, capsys):
    monkeypatch.setenv(HEARTBEAT_ENV, "3")
    assert supernode.main(["--insecure", "--superlink", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {HEARTBEAT_ENV}='3'") and err.count("\n") == 1
