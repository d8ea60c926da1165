"""Run a whole federation on one machine.

Two backends run the same ServerApp and ClientApp objects ``flwr run .`` uses
(``server.app:app``, ``clients.app:app``, loaded by name: ``fedmeta`` never
imports them):

* ``ray`` (default): Flower's simulation engine; every site is a Ray actor.
* ``inline``: ``fedmeta.inline_grid``; every site is called in this process,
  one after the other. No Ray start-up, so a small run takes seconds; the
  same seed gives the same metrics as with ``ray``.

The run config reaches the ServerApp through the run directory's
``config.json`` (named by ``FEDMETA_RUN_CONFIG``) because Flower's in-process
simulation API passes an empty run config; sites receive it with every
round's message. ``FEDMETA_TRANSPORT`` says the sites are simulated;
``FEDMETA_RESUME=1`` asks the ServerApp to continue the directory's stopped run.
Round callbacks (``fedmeta.rounds``) reach the ServerApp in this process with
either backend. With ``ray``, Ray binds 127.0.0.1 only, and the run is confined to a
loopback-only network namespace where the process may make one (``fedmeta.netns``:
root, or ``fedmeta simulate`` in a user namespace of its own); elsewhere, or with
``FEDMETA_ALLOW_NETWORK=1``, a one-line warning says which ports are open.
The typed, documented entry point is ``fedmeta.simulate``
(``fedmeta.api``); this module returns the raw summary dict.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from fedmeta.config import BACKENDS, RunConfig, resolve_device
from fedmeta.netns import (
    Confinement,
    NamespaceUnavailable,
    loopback_only,
    network_allowed,
    ray_on_loopback,
)
from fedmeta.offline import no_call_home
from fedmeta.paths import (
    ALLOW_NETWORK_ENV,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    RESUME_ENV,
    RUN_CONFIG_ENV,
    SUMMARY_FILE,
    TRANSPORT_ENV,
)
from fedmeta.rounds import RoundCallback, listening

SERVER_APP = "server.app:app"
CLIENT_APP = "clients.app:app"
RAY_EXIT_GRACE_S = 10.0  # how long Ray's processes get to exit after ray.shutdown()
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
LOOPBACK = "127.0.0.1"

logger = logging.getLogger(__name__)


class RunDirError(ValueError):
    """The run directory cannot be used (one line, names the directory)."""


def prepare_run_dir(cfg: RunConfig, overwrite: bool = False) -> Path:
    out = Path(cfg.out_dir)
    if (out / METRICS_FILE).exists():
        if not overwrite:
            raise RunDirError(
                f"{out}: already holds a run (metrics.jsonl); choose another --out or pass "
                "--overwrite (site ledgers under sites/ are kept either way)"
            )
        for name in (METRICS_FILE, SUMMARY_FILE):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)  # they belong to that run
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / CONFIG_FILE)
    return out


def backend_config(cfg: RunConfig) -> dict[str, Any]:
    """Ray resources: one CPU per site actor; a fraction of a GPU per site when CUDA is used."""
    import torch

    ncpu = os.cpu_count() or 1
    device = resolve_device(cfg.device)
    gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    per_site_gpu = min(1.0, gpus / min(cfg.sites, ncpu)) if gpus else 0.0
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": per_site_gpu},
        "init_args": {
            "num_cpus": ncpu,
            "num_gpus": gpus,
            "include_dashboard": False,
            "logging_level": "error",
            "log_to_driver": False,
            "_node_ip_address": LOOPBACK,
        },
    }


def simulate(
    cfg: RunConfig,
    *,
    overwrite: bool = False,
    backend: str = "ray",
    resume: bool = False,
    on_round: RoundCallback | None = None,
) -> dict[str, Any]:
    """Run ``cfg`` to completion on ``backend`` (``ray`` or ``inline``); returns the run
    summary (``summary["status"]`` is ``completed`` or ``failed``). ``resume``: continue
    the stopped run in ``cfg.out_dir`` from its last checkpoint. What is printed is set
    by ``fedmeta.logs.configure``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    no_call_home()
    out = resume_dir(cfg) if resume else prepare_run_dir(cfg, overwrite)
    if backend == "ray":
        # callbacks run outside the confinement (e.g. MLflow on another machine)
        with (
            _run_env(out, resume),
            _confined() as jail,
            listening(jail.wrap(on_round) if jail and on_round else on_round),
        ):
            _simulate_ray(cfg)
    else:
        with _run_env(out, resume), listening(on_round):
            _simulate_inline(cfg)
    summary_path = out / SUMMARY_FILE
    if not summary_path.exists():
        raise RuntimeError(f"{out}: the simulation ended without a summary; see the log above")
    return json.loads(summary_path.read_text())


def resume_dir(cfg: RunConfig) -> Path:
    """The run directory of a run to resume (it must hold that run's config.json)."""
    out = Path(cfg.out_dir)
    if not (out / CONFIG_FILE).is_file():
        raise RunDirError(
            f"{out}: no {CONFIG_FILE}; --resume needs the directory of a run started before"
        )
    (out / SUMMARY_FILE).unlink(missing_ok=True)
    return out


def load_run_config(run_dir: Path) -> RunConfig:
    """The config a run directory was started with (for ``--resume``)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise RunDirError(f"{run_dir}: no {CONFIG_FILE}; is this a run directory?")
    cfg = RunConfig.load(path)
    if Path(cfg.out_dir).resolve() != Path(run_dir).resolve():
        raise RunDirError(
            f"{path}: names out-dir {cfg.out_dir!r}, not {str(run_dir)!r}; resume "
            "from the directory the run was started in (and with the same "
            "working directory for a relative out-dir)"
        )
    return cfg


@contextlib.contextmanager
def _run_env(out: Path, resume: bool = False) -> Iterator[None]:
    """The run's config file, transport and resume flag, for the ServerApp; restored
    afterwards."""
    saved = {k: os.environ.get(k) for k in (RUN_CONFIG_ENV, TRANSPORT_ENV, RESUME_ENV)}
    os.environ[RUN_CONFIG_ENV] = str((out / CONFIG_FILE).resolve())
    os.environ[TRANSPORT_ENV] = "simulation"
    os.environ[RESUME_ENV] = "1" if resume else "0"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _confined() -> Iterator[Confinement | None]:
    """A loopback-only network namespace for the Ray run (``None``: none, warned)."""
    on_loopback = ray_on_loopback()
    if network_allowed():
        _warn_exposed(f"{ALLOW_NETWORK_ENV}=1", on_loopback)
        yield None
        return
    with contextlib.ExitStack() as stack:
        try:
            jail: Confinement | None = stack.enter_context(loopback_only())
        except NamespaceUnavailable as exc:
            _warn_exposed(str(exc), on_loopback)
            jail = None
        yield jail


def _warn_exposed(why: str, on_loopback: bool) -> None:
    where = (
        "bound to 127.0.0.1, so open to every local user"
        if on_loopback
        else "on every interface, so open to other machines"
    )
    logger.warning(
        f"Ray's GCS, raylet and worker ports are open in this machine's network while this "
        f"run lasts, {where} (no loopback-only network namespace: {why}); on a shared "
        "machine use --backend inline"
    )


def _simulate_ray(cfg: RunConfig) -> None:
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silence Ray's GPU tip
    # one machine: Ray's node address is the loopback one, as Ray does on macOS and Windows
    # (otherwise Ray binds all interfaces, and asks public DNS servers for its address)
    ray_on_loopback()
    from flwr.simulation import run_simulation
    from flwr.supercore.object_ref import load_app

    server_app = load_app(SERVER_APP, ValueError)
    client_app = load_app(CLIENT_APP, ValueError)
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    _adopt_orphans()
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=cfg.sites,
            backend_config=backend_config(cfg),
        )
    finally:
        _stop_ray(before)


def _simulate_inline(cfg: RunConfig) -> None:
    from flwr.supercore.object_ref import load_app

    from fedmeta.inline_grid import run_inline

    server_app = load_app(SERVER_APP, ValueError)
    run_inline(server_app, _fresh_app(CLIENT_APP), cfg.sites)


def _fresh_app(ref: str) -> Any:
    """Load ``module:attribute`` from a fresh import of its module: the ClientApp's
    module-level state lives for one run, as in a SuperNode's or Ray actor's process."""
    from flwr.supercore.object_ref import load_app

    module = ref.partition(":")[0]
    if module in sys.modules:
        importlib.reload(sys.modules[module])
    return load_app(ref, ValueError)


def _adopt_orphans() -> None:
    """Linux: become a child subreaper, so a Ray worker orphaned when its raylet is
    killed is re-parented to this process (not to init) and `_stop_ray` can wait for it."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _stop_ray(keep: set[int]) -> None:
    """Shut Ray down and wait until every process the simulation started has exited.

    ``ray.shutdown()`` SIGKILLs a raylet that outlives SIGTERM by a second without
    waiting for it, and its workers leave only once they notice it is gone; without
    this wait `fedmeta simulate` could return while Ray processes are still exiting.
    Processes that were children before the run (``keep``) are left alone; the
    others get a grace period, then are killed.
    """
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:  # pragma: no cover - ray ships with flwr[simulation]
        pass
    started = [
        child for child in psutil.Process().children(recursive=True) if child.pid not in keep
    ]
    _, alive = psutil.wait_procs(started, timeout=RAY_EXIT_GRACE_S)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=RAY_EXIT_GRACE_S)
