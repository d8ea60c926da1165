"""A ClientApp process dies with the node above it (fedmeta.deploy.lifeline), real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

CHILD = """
import sys, time
from fedmeta.deploy.lifeline import hold_lifeline
print(hold_lifeline(0.1), flush=True)
while True:  # a long training step that ignores SIGINT
    time.sleep(0.05)
"""
# stands in for `fedmeta node supernode` -> flower-superexec -> flwr-clientapp
NODE = """
import subprocess, sys, time
sys.argv[0] = 'supernode'
child = subprocess.Popen([sys.executable, '-c', {child!r}], stdout=open({out!r}, 'w'))
print(child.pid, flush=True)
time.sleep(600)
"""


def test_a_killed_node_leaves_no_training_process(tmp_path: Path):
    out = tmp_path / "child.out"
    child = None
    node = subprocess.Popen([sys.executable, "-c", NODE.format(child=CHILD, out=str(out)),
                             "supernode"], stdout=subprocess.PIPE, text=True)
    try:
        child = int(node.stdout.readline())
        deadline = time.monotonic() + 60
        while out.read_text().strip() != "True":  # the watcher found the node and runs
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
        node.send_signal(signal.SIGKILL)
        node.wait()
        deadline = time.monotonic() + 5
        while psutil.pid_exists(child) and psutil.Process(child).status() != "zombie":
            assert time.monotonic() < deadline, "the ClientApp outlived its node"
            time.sleep(0.05)
    finally:  # whatever happened, nothing of this test keeps running
        if node.poll() is None:
            os.kill(node.pid, signal.SIGKILL)
        try:
            if child is not None and "lifeline" in " ".join(psutil.Process(child).cmdline()):
                os.kill(child, signal.SIGKILL)
        except psutil.Error:  # gone, or a zombie waiting for its new parent
            pass


def test_without_a_node_above_nothing_is_watched():
    from fedmeta.deploy.lifeline import hold_lifeline

    assert hold_lifeline() is False  # pytest is not under a SuperNode: never kills it
