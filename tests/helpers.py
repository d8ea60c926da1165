"""Shared test helpers: run the real ``fedmeta`` CLI in a subprocess, or a whole
federation in this process (``run_inline``: the real ServerApp and ClientApp on
``fedmeta.inline_grid``, no Ray).

Ray binds its services on all interfaces; when we are root and ``unshare``
exists, simulations run in a fresh network namespace that has only the
loopback interface, so nothing a test starts is reachable from outside.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
FEDMETA = [sys.executable, "-m", "fedmeta.cli"]
# the example plug-in (examples/plugin): a task by entry point, a model factory
PLUGIN = ROOT / "examples" / "plugin"
TASK_EP = "blobs-fewshot"
MODEL = "fedmeta_example_plugin.models:wide_mlp"


def loopback_only() -> list[str]:
    if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip"):
        probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
        if probe.returncode == 0:
            return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    return []


def fedmeta(
    *args: str, timeout: float = 600, cwd: Path | None = None, isolate: bool = True
) -> subprocess.CompletedProcess[str]:
    cmd = (loopback_only() if isolate else []) + FEDMETA + list(args)
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT, env=env
    )


def run_inline(out: Path, overwrite: bool = False, **settings: Any) -> dict[str, Any]:
    """Simulate in this process with the inline backend; ``settings`` are config keys
    (``fraction_train=1.0`` or ``**{"fraction-train": 1.0}``). Returns the summary."""
    from fedmeta.config import RunConfig
    from fedmeta.simulation import simulate

    cfg = RunConfig.from_flat({**settings, "out-dir": str(out)}, source="test")
    return simulate(cfg, overwrite=overwrite, backend="inline")


def copy_project(dest: Path) -> Path:
    """Copy the project's files (tracked + untracked, not ignored) to ``dest`` for `flwr run`."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read_bytes())
    return dest


# ---- sites with manifests and record metadata (policy tests, report tests) --------------
NOW = datetime.now(UTC)
PURPOSE = "research.model-training"
AGE = {"GDPR-MINORS": "12", "DPDP-9-1": "17"}


def consent_declaration(path: Path) -> Path:
    from policies import EXAMPLE_RUN

    text = EXAMPLE_RUN.read_text()
    text = text.replace('lawful_basis = "e"', 'lawful_basis = "a"')
    text = text.replace('special_category_condition = "j"', 'special_category_condition = "a"')
    path.write_text(text)
    path.with_name("dpia.toml").write_text(EXAMPLE_RUN.with_name("dpia.toml").read_text())
    return path


def manifest(
    site_id: str,
    country: str = "DE",
    safeguards: str = "[]",
    packs: str = '["gdpr"]',
    extra: str = "",
    log_days: int = 730,
) -> str:
    return f"""
site_id = "{site_id}"
institution = "Hospital {site_id}"
country = "{country}"
role = "joint-controller"
data_categories = ["health"]
data_subjects = ["patients", "minors"]
approved_purposes = ["{PURPOSE}"]
lawful_basis = "a"
retention_days = 3650
log_retention_days = {log_days}
transfer_safeguards = {safeguards}
epsilon_max = 10.0
delta = 1e-5
law_packs = {packs}
{extra}
"""


def write_site(
    root: Path, index: int, text: str, plan: dict[str, int] | None = None, num_sites: int = 4
) -> Path:
    from fedmeta.data.tasks import get_task

    site_dir = root / "sites" / f"site-{index}"
    site_dir.mkdir(parents=True)
    (site_dir / "manifest.toml").write_text(text)
    ids = get_task("digits-fewshot", num_sites=num_sites).site_records(index).record_ids
    rows = [
        "record_id,consent_purposes,consent_withdrawn_at,age,guardian_consent,"
        "collected_at,erasure_requested"
    ]
    old = (NOW - timedelta(days=20 * 365)).date().isoformat()
    recent = (NOW - timedelta(days=300)).date().isoformat()
    withdrawn = (NOW - timedelta(days=3)).date().isoformat()
    kinds: list[str] = []
    for rule, n in (plan or {}).items():
        kinds += [rule] * n
    for i, rid in enumerate(ids):
        kind = kinds[i] if i < len(kinds) else None
        rows.append(
            ",".join(
                [
                    rid,
                    PURPOSE,
                    withdrawn if kind == "GDPR-7-3" else "",
                    AGE.get(kind or "", "40"),
                    "false",
                    old if kind == "GDPR-5-1-e" else recent,
                    "true" if kind == "GDPR-17" else "false",
                ]
            )
        )
    (site_dir / "records-meta.csv").write_text("\n".join(rows) + "\n")
    return site_dir


def example_site_on_bundled_data() -> str:
    """The example German hospital's manifest for a site whose records are the bundled
    public digits: they carry no ages and no collection dates, so the site declares no
    minors and no recorded collection dates (else its record rules leave every record out
    as of unknown age or date, as they must)."""
    from policies import EXAMPLE_SITE

    text = EXAMPLE_SITE.read_text()
    text = text.replace('data_subjects = ["patients", "minors"]', 'data_subjects = ["patients"]')
    return text.replace("collection_dates_recorded = true", "collection_dates_recorded = false")


def clinic_manifest(
    site_id: str,
    features: str = '["age_band", "bmi", "glucose"]',
    subjects: str = '["patients", "minors"]',
    extra: str = "",
) -> str:
    """A German clinic's manifest for a tabular site (public-interest research, Art. 9(2)(j))."""
    return f"""
site_id = "{site_id}"
institution = "Clinic {site_id}"
country = "DE"
role = "joint-controller"
data_categories = ["health"]
data_subjects = {subjects}
approved_purposes = ["research.model-training"]
lawful_basis = "e"
art6_3_law = "DE: Land hospital act, research provision (test)"
art9_condition = "j"
art9_law = "DE: Land hospital act, research provision (test)"
retention_days = 3650
log_retention_days = 730
epsilon_max = 20.0
delta = 1e-5
law_packs = ["gdpr"]
feature_columns = {features}
{extra}"""


def processes_with_env(key: str, value: str) -> list[int]:
    """PIDs of the processes whose environment holds KEY=VALUE (to stop what a test started)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"{key}={value}".encode() in env:
            found.append(int(pid))
    return found


# ---- a Flower project of the user's own: its server.py, clients/, policies/ ---------------
SHADOWS = {
    "server.py": "raise SystemExit('the user server.py was imported')",
    "clients/__init__.py": "raise SystemExit('the user clients/ was imported')",
    "policies/__init__.py": "raise SystemExit('the user policies/ was imported')",
}


def shadowing_project(root: Path) -> Path:
    """A directory whose modules would shadow fedmeta's own if anything imported from the
    working directory (common in Flower projects); each one exits loudly when imported."""
    for name, text in SHADOWS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    return root


def shadows_in(root: Path) -> bool:
    return all((root / name).read_text() == text + "\n" for name, text in SHADOWS.items())


# ---- the processes a test leaves behind ----------------------------------------------------
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


@contextlib.contextmanager
def adopting_orphans() -> Iterator[None]:
    """Linux: while inside, a process orphaned below this one is re-parented to it (not
    to init), so ``own_processes`` still sees what a finished command left behind."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
    if prctl:
        prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
    finally:
        if prctl:
            prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def own_processes() -> dict[int, str]:
    """Live processes below this test process: pid -> command line (zombies reaped)."""
    import psutil

    found = {}
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.status() == psutil.STATUS_ZOMBIE:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(proc.pid, os.WNOHANG)
                continue
            found[proc.pid] = " ".join(proc.cmdline())[:200]
    return found


# ---- the suite's shared real Ray simulation (tests/conftest.py: ``ray_run``) ---------------
RAY_RUN_SETTINGS = {
    "task": "digits-fewshot",
    "sites": 3,
    "rounds": 3,
    "seed": 5,
    "eval-every": 0,
    "eval-episodes": 5,
    "adapt-steps": 5,
}


def cli_args(settings: dict[str, Any]) -> list[str]:
    """``fedmeta simulate`` options for config ``settings``."""
    args: list[str] = []
    for key, value in settings.items():
        if key in ("task", "sites", "rounds", "seed", "strategy"):
            args += [f"--{key}", str(value)]
        else:
            args += ["--set", f"{key}={value}"]
    return args


class RayRun(NamedTuple):
    out: Path  # the run directory
    res: subprocess.CompletedProcess[str]  # the CLI's exit status and output
    leftover: dict[int, str]  # processes it left running (pid -> command line)
    cwd: Path  # where the CLI ran: a directory with modules that would shadow ours
    # as root (netcheck.CAN_ADDRESS), what its processes listened on (netcheck.watch_run)
    exposed: set[str]
    seen: set[str]
    userns: set[str]


def install_example_plugin() -> None:
    """pip-install the example plug-in (editable, no dependencies) into this venv once;
    one worker at a time (a lock file next to the venv's packages)."""
    import fcntl
    import importlib
    import site
    import sysconfig
    from importlib.metadata import entry_points

    def installed() -> bool:
        return any(ep.name == TASK_EP for ep in entry_points(group="fedmeta.tasks"))

    purelib = sysconfig.get_paths()["purelib"]
    if not installed():
        with open(Path(purelib) / ".fedmeta-test-plugin.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            importlib.invalidate_caches()
            if not installed():
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "pip",
                        "install",
                        "-q",
                        "--no-deps",
                        "--no-build-isolation",
                        "-e",
                        str(PLUGIN),
                    ],
                    check=True,
                    capture_output=True,
                    timeout=300,
                )
    site.addsitedir(purelib)  # this process: run its .pth if another process installed it
    importlib.invalidate_caches()
    assert installed()


def built_once_per_session(tmp_path_factory: Any, name: str, build: Callable[[Path], None]) -> Path:
    """``tmp/<name>/``, built by ``build(path)`` once per test session, whichever pytest-xdist
    worker asks first; another worker waits for it (a lock file) and reads the same files.
    For runs that tests only read. A build that fails leaves no "built" mark, so the next
    asker builds again and fails the same way. Without xdist: once in this session's tmp."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's tmp root, shared by its workers
    path, done = base / name, base / f"{name}.built"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            build(path)
            done.touch()
    return path
