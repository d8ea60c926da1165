"""Driving a real deployment from a test: commands from docs/deploy.md, processes by PID.

* :class:`Deployment` runs every command from a *template* (``fedmeta node check
  <site-dir>``) with placeholders filled in, and records the template, so the test
  can assert that every command of ``docs/deploy.md`` was really run.
* Every process it starts carries a unique environment tag; cleanup finds them (and
  all their children, which inherit the environment) in ``/proc`` and stops them
  by PID. Nothing else is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from helpers import copy_project as copy_tree

from fedmeta.offline import OFFLINE_ENV

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "deploy.md"
BIN = Path(sys.executable).parent
TAG = "FEDMETA_DEPLOY_TEST_TAG"


def doc_commands(text: str) -> list[str]:
    """Every command line of the ```sh blocks (comments dropped, continuations joined)."""
    out: list[str] = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, flags=re.S | re.M):
        pending = ""
        for line in block.splitlines():
            line = line.rstrip()
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.endswith("\\"):
                pending += line[:-1].strip() + " "
                continue
            out.append(" ".join((pending + line.strip()).split()))
            pending = ""
    return out


def doc_block(text: str, lang: str, marker: str) -> str:
    """The first ```lang block whose first line is ``# marker``."""
    for block in re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M):
        if block.startswith(f"# {marker}"):
            return block
    raise AssertionError(f"docs/deploy.md has no ```{lang} block starting with '# {marker}'")


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def wait_for(pred: Callable[[], object], timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class Deployment:
    """Commands and processes of one test deployment under ``tmp``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.logs = tmp / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.tag = uuid.uuid4().hex
        self.flwr_home = tmp / "coordinator-flwr-home"
        # the offline switches are NOT inherited (importing fedmeta set them in this
        # process): the guide's commands get them only by sourcing a kit's env file
        # (:meth:`source`), the kits' scripts by sourcing theirs, fedmeta by itself
        base = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENV}
        self.env = {
            **base,
            TAG: self.tag,
            "COLUMNS": "200",
            "PYTHONUNBUFFERED": "1",
            "FLWR_HOME": str(self.flwr_home),
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        }
        self.offline = {**self.env, **OFFLINE_ENV}  # for the test's own flwr calls
        self.ran: list[str] = []
        self.procs: dict[str, subprocess.Popen] = {}
        self.timings: dict[str, float] = {}
        self.t0 = time.monotonic()

    def _env(self, extra: dict[str, str | None] | None) -> dict[str, str]:
        """Our environment with ``extra`` applied; a None value removes the variable."""
        merged = {**self.env, **(extra or {})}
        return {k: v for k, v in merged.items() if v is not None}

    def expand(self, template: str, subs: dict[str, object]) -> str:
        """The command with its placeholders filled in (a list fills in several words)."""
        cmd = template
        for key, val in subs.items():
            words = val if isinstance(val, list) else [val]
            cmd = cmd.replace(f"<{key}>", " ".join(shlex.quote(str(v)) for v in words))
        assert "<" not in re.sub(r"<<|>>|2>&1", "", cmd), f"unfilled placeholder in {cmd!r}"
        return cmd

    def run(
        self,
        template: str,
        cwd: Path,
        *,
        expect: int | None = 0,
        timeout: float = 120,
        env: dict[str, str | None] | None = None,
        **subs: object,
    ) -> subprocess.CompletedProcess:
        """Run one command (bash -c) and record its template."""
        self.ran.append(" ".join(template.split()))
        cmd = self.expand(template, subs)
        t = time.monotonic()
        res = subprocess.run(
            ["bash", "-c", cmd],
            cwd=cwd,
            env=self._env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        self.note(template, t)
        if expect is not None:
            assert res.returncode == expect, (
                f"{cmd!r} exited {res.returncode}, expected {expect}:\n"
                f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
            )
        return res

    def note(self, what: str, since: float) -> None:
        """One line of ``commands.jsonl``: what ran, when it started and how long it took
        (seconds since the deployment began), to see where the test's time goes."""
        line = {
            "at": round(since - self.t0, 1),
            "s": round(time.monotonic() - since, 1),
            "what": " ".join(what.split()),
        }
        with open(self.tmp / "commands.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    def source(self, template: str, cwd: Path, **subs: object) -> dict[str, str]:
        """Run a guide's ``. FILE`` line: the variables it exports stay set for every later
        command of this deployment (as in the shell session the guide describes)."""
        self.ran.append(" ".join(template.split()))
        cmd = self.expand(template, subs)
        res = subprocess.run(
            ["bash", "-c", f"{cmd} && env -0"],
            cwd=cwd,
            env=self.env,
            capture_output=True,
            timeout=60,
        )
        assert res.returncode == 0, f"{cmd!r} failed: {res.stderr.decode()[-2000:]}"
        after = dict(x.split("=", 1) for x in res.stdout.decode().split("\0") if "=" in x)
        added = {
            k: v
            for k, v in after.items()
            if self.env.get(k) != v and not k.startswith(("_", "SHLVL", "PWD", "OLDPWD"))
        }
        self.env.update(added)
        return added

    def start(
        self,
        name: str,
        template: str,
        cwd: Path,
        *,
        record: bool = True,
        env: dict[str, str | None] | None = None,
        **subs: object,
    ) -> subprocess.Popen:
        """Start a long-running command in its own session; output to logs/<name>.log."""
        if record:
            self.ran.append(" ".join(template.split()))
        cmd = self.expand(template, subs)
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            ["bash", "-c", f"exec {cmd}"],
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self._env(env),
            start_new_session=True,
        )
        log.close()
        self.note(f"start {name}", time.monotonic())
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def flwr_nodes(self, federation: str) -> list[dict]:
        res = subprocess.run(
            ["flwr", "supernode", "ls", federation, "--format", "json"],
            env=self.offline,
            capture_output=True,
            text=True,
            timeout=60,
        )
        try:
            return json.loads(res.stdout[res.stdout.index("{") :])["nodes"]
        except (ValueError, KeyError):
            return []

    # ---- processes -----------------------------------------------------------------
    def tagged_pids(self) -> list[int]:
        needle = f"{TAG}={self.tag}".encode()
        found = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if needle in env:
                found.append(int(pid))
        return found

    def stop_all(self, grace: float = 10.0) -> None:
        """SIGTERM every process this deployment started (and their children), then SIGKILL."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            # our direct children too: nginx overwrites its environment with its process
            # title, so its master is not found by the tag (its workers follow the master)
            pids = set(self.tagged_pids()) | {
                p.pid for p in self.procs.values() if p.poll() is None
            }
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            for proc in self.procs.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.1)
            deadline = time.monotonic() + wait
            while self.tagged_pids() and time.monotonic() < deadline:
                for proc in self.procs.values():
                    proc.poll()
                time.sleep(0.2)
            if not self.tagged_pids() and all(p.poll() is not None for p in self.procs.values()):
                return

    def listening(self) -> list[str]:
        """Local addresses of TCP sockets in LISTEN state owned by our processes."""
        inodes: set[str] = set()
        running = {p.pid for p in self.procs.values() if p.poll() is None}  # nginx: see stop_all
        for pid in set(self.tagged_pids()) | running:
            try:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
            except OSError:
                continue
        out = []
        for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
            try:
                lines = Path(table).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                parts = line.split()
                if parts[3] == "0A" and parts[9] in inodes:
                    out.append(_address(parts[1], v6))
        return out


def _address(hex_addr: str, v6: bool) -> str:
    ip_hex, port_hex = hex_addr.split(":")
    raw = bytes.fromhex(ip_hex)
    if v6:
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
        ip = socket.inet_ntop(socket.AF_INET6, raw)
    else:
        ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
    return f"{ip}:{int(port_hex, 16)}"


def copy_project(dest: Path, extra_config: dict[str, object]) -> Path:
    """Copy the project (tracked + untracked, not ignored) like tests/test_flwr_run.py, and
    add run-config keys the app's [tool.flwr.app.config] lacks (flwr refuses unknown keys)."""
    copy_tree(dest)
    pyproject = dest / "pyproject.toml"
    text = pyproject.read_text()
    import tomllib

    table = tomllib.loads(text)["tool"]["flwr"]["app"]["config"]
    missing = {k: v for k, v in extra_config.items() if k not in table}
    if missing:
        lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in missing.items())
        text = text.replace("[tool.flwr.app.config]\n", "[tool.flwr.app.config]\n" + lines, 1)
        pyproject.write_text(text)
    return dest
