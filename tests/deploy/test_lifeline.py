"""A killed node leaves no training process behind (fedmeta.deploy.lifeline), real processes.

The chain is the one of a site: a node process starts the SuperExec through the
lifeline, which starts a ClientApp through it; here both are real Flower entry points
(``flower-superexec``, ``flwr-clientapp``) pointed at an API nobody serves, so they keep
retrying, as a process busy training would keep running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from fedmeta.deploy.lifeline import routed

NODE = """
import os, subprocess, sys, time
from fedmeta.deploy.lifeline import RoutedSubprocess, routed
kind, flower, api = sys.argv[1:4]
token = ['--token', 't'] if kind == 'clientapp' else []  # flwr-clientapp requires one
child = RoutedSubprocess(routed(kind)).Popen(
    [flower, api, '127.0.0.1:9', '--insecure', *token, '--parent-pid', str(os.getpid())],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(child.pid, flush=True)
time.sleep(600)
"""


def test_flower_commands_are_routed_through_the_lifeline():
    assert routed("superexec")(["flower-superexec", "--parent-pid", "7"]) == [
        sys.executable,
        "-m",
        "fedmeta.deploy.lifeline",
        "superexec",
        "--parent-pid",
        "7",
    ]
    assert routed("clientapp")(["/x/bin/flwr-clientapp", "-a"])[3:] == ["clientapp", "-a"]
    assert routed("clientapp")(["flwr-serverapp", "-a"]) == ["flwr-serverapp", "-a"]


@pytest.mark.parametrize(
    ("kind", "flower", "api"),
    [
        ("clientapp", "flwr-clientapp", "--runtime-api-address"),  # below the SuperExec
        ("superexec", "flower-superexec", "--runtime-api-address"),  # below the SuperNode
    ],
)
def test_a_killed_parent_leaves_no_flower_process(kind, flower, api):
    node = subprocess.Popen(
        [sys.executable, "-c", NODE, kind, flower, api], stdout=subprocess.PIPE, text=True
    )
    child = None
    try:
        child = psutil.Process(int(node.stdout.readline()))
        time.sleep(3)  # it imports Flower and retries its API: alive, below the node
        assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE
        assert f"fedmeta.deploy.lifeline {kind}" in " ".join(child.cmdline())
        node.send_signal(signal.SIGKILL)
        node.wait()
        deadline = time.monotonic() + 3
        while child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, f"{flower} outlived its parent"
            time.sleep(0.05)
    finally:  # whatever happened, nothing of this test keeps running
        if node.poll() is None:
            os.kill(node.pid, signal.SIGKILL)
        try:
            if child is not None and child.is_running():
                child.kill()
        except psutil.Error:
            pass
