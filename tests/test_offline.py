import subprocess
import sys

from fedmeta.offline import OFFLINE_ENV


def test_entry_points_switch_off_every_call_home():
    keys = sorted(OFFLINE_ENV)
    code = (
        "import os, fedmeta.cli, clients.app, server.app; "
        f"print({{k: os.environ.get(k) for k in {keys!r}}})"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k not in OFFLINE_ENV}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert eval(out) == OFFLINE_ENV
