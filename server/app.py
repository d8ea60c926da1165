"""Flower ServerApp (``server.app:app``): reads the run config, runs ``server.run``."""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmeta.config import RunConfig
from fedmeta.inline_grid import TRANSPORT_KEY
from fedmeta.offline import quiet_flower
from fedmeta.paths import RESUME_ENV, RUN_CONFIG_ENV
from server.run import NOT_RECORDED, SIMULATION, run_server, stated_transport

#: `flwr run . --run-config 'resume="runs/flwr/<run-id>"'`: continue that stopped run
RESUME_KEY = "resume"


def config_for(context: Context) -> RunConfig:
    """`flwr run`: Flower's run config (with ``resume``: the config the resumed run was
    started with, its other keys ignored); `fedmeta simulate`: the run directory's
    config.json."""
    if run_dir := resume_dir_of(context):
        from fedmeta.simulation import load_run_config

        return load_run_config(run_dir)
    if context.run_config:
        flat = {k: v for k, v in context.run_config.items() if k != RESUME_KEY}
        return RunConfig.from_flat(flat, source="run config")
    if RUN_CONFIG_ENV in os.environ:
        return RunConfig.load(Path(os.environ[RUN_CONFIG_ENV]))
    return RunConfig()


def resume_dir_of(context: Context) -> Path | None:
    """The run directory Flower's run config asks to resume (``resume``; '' = none)."""
    value = str(context.run_config.get(RESUME_KEY, "") or "")
    return Path(value) if value else None


def transport_for(grid: Grid, context: Context) -> str:
    """How this ServerApp's sites are reached, as its launcher states it.

    In order: the context's node config (``fedmeta-transport``, set by
    ``fedmeta.inline_grid.run_inline``); ``FEDMETA_TRANSPORT`` (exported by fedmeta's
    start scripts and by ``fedmeta simulate``); else Flower's own simulation runtime
    (``flwr run .`` against a local simulation federation, which exports nothing)."""
    stated = str(context.node_config.get(TRANSPORT_KEY, "")) or stated_transport()
    if stated == NOT_RECORDED and in_flower_simulation_runtime(grid):
        return SIMULATION
    return stated


def in_flower_simulation_runtime(grid: Grid) -> bool:
    """Whether Flower's simulation runtime (``flwr run .`` to a local simulation) runs
    this ServerApp. Flower's Context, run config and Run carry nothing that tells a
    simulation from a deployment, so this is the one place that asks the grid's type:
    the simulation runtime drives the ServerApp through an ``InMemoryGrid``, a
    deployment through a ``GrpcGrid``."""
    from flwr.superlink.grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


def make_server_app(cfg: RunConfig | None = None, resume: bool | None = None) -> ServerApp:
    """A ServerApp bound to ``cfg`` (``fedmeta simulate``) or to Flower's run config.

    ``resume`` continues the stopped run of the config's run directory (default:
    ``FEDMETA_RESUME=1`` in the environment, set by ``fedmeta simulate --resume``, or a
    ``resume`` run-config key naming the run directory, given to ``flwr run``).
    Round callbacks hear every metrics line through :func:`fedmeta.rounds.listening`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        quiet_flower()
        run_cfg = cfg or config_for(context)
        again = (
            resume
            if resume is not None
            else (os.environ.get(RESUME_ENV) == "1" or resume_dir_of(context) is not None)
        )
        run_server(grid, run_cfg, resume=again, transport=transport_for(grid, context))

    return app


app = make_server_app()
