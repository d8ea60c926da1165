"""Run a whole federation on one machine with Flower's simulation engine.

The ServerApp and ClientApp are the same objects ``flwr run .`` uses
(``server.app:app``, ``clients.app:app``, loaded by name: ``fedmeta`` never
imports them). The run config reaches the ServerApp through the run
directory's ``config.json`` (named by ``FEDMETA_RUN_CONFIG``) because Flower's
in-process simulation API passes an empty run config; sites receive it with
every round's message.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from fedmeta.config import RunConfig, resolve_device
from fedmeta.metrics import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE
from fedmeta.offline import no_call_home

SERVER_APP = "server.app:app"
CLIENT_APP = "clients.app:app"
RUN_CONFIG_ENV = "FEDMETA_RUN_CONFIG"


class RunDirError(ValueError):
    """The run directory cannot be used (one line, names the directory)."""


def prepare_run_dir(cfg: RunConfig, overwrite: bool = False) -> Path:
    out = Path(cfg.out_dir)
    if (out / METRICS_FILE).exists():
        if not overwrite:
            raise RunDirError(
                f"{out}: already holds a run (metrics.jsonl); choose another --out or pass "
                "--overwrite (site ledgers under sites/ are kept either way)")
        for name in (METRICS_FILE, SUMMARY_FILE):
            (out / name).unlink(missing_ok=True)
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
        "init_args": {"num_cpus": ncpu, "num_gpus": gpus, "include_dashboard": False,
                      "logging_level": "error", "log_to_driver": False},
    }


def simulate(cfg: RunConfig, *, overwrite: bool = False, verbose: bool = False) -> dict[str, Any]:
    """Run ``cfg`` to completion in Flower's simulation engine; returns the run summary."""
    no_call_home()
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silence Ray's GPU tip
    if not verbose:  # Flower's deprecation notice for run_simulation is not the user's concern
        logging.getLogger("flwr").setLevel(logging.ERROR)
    out = prepare_run_dir(cfg, overwrite)
    os.environ[RUN_CONFIG_ENV] = str((out / CONFIG_FILE).resolve())
    from flwr.simulation import run_simulation
    from flwr.supercore.object_ref import load_app

    server_app = load_app(SERVER_APP, ValueError)
    client_app = load_app(CLIENT_APP, ValueError)
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.sites,
                       backend_config=backend_config(cfg), verbose_logging=verbose)
    finally:
        os.environ.pop(RUN_CONFIG_ENV, None)
        _stop_ray()
    summary_path = out / SUMMARY_FILE
    if not summary_path.exists():
        raise RuntimeError(f"{out}: the simulation ended without a summary; see the log above")
    return json.loads(summary_path.read_text())


def _stop_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:  # pragma: no cover - ray ships with flwr[simulation]
        pass
