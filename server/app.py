"""Flower ServerApp (``server.app:app``): reads the run config, runs ``server.run``."""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmeta.config import RunConfig
from fedmeta.offline import quiet_flower
from server.run import RoundCallback, run_server

RUN_CONFIG_ENV = "FEDMETA_RUN_CONFIG"  # set by `fedmeta simulate` (fedmeta.simulation)
RESUME_ENV = "FEDMETA_RESUME"  # "1": continue the run directory's stopped run (--resume)


def config_for(context: Context) -> RunConfig:
    """`flwr run`: Flower's run config; `fedmeta simulate`: the run directory's config.json."""
    if context.run_config:
        return RunConfig.from_flat(dict(context.run_config), source="run config")
    if RUN_CONFIG_ENV in os.environ:
        return RunConfig.load(Path(os.environ[RUN_CONFIG_ENV]))
    return RunConfig()


def make_server_app(cfg: RunConfig | None = None, on_round: RoundCallback | None = None,
                    result: dict | None = None, resume: bool | None = None) -> ServerApp:
    """A ServerApp bound to ``cfg`` (``fedmeta simulate``) or to Flower's run config.

    ``on_round`` receives each metrics line (a dict); ``result`` is filled with the
    summary; ``resume`` continues the stopped run of the config's run directory
    (default: ``FEDMETA_RESUME=1`` in the environment, set by ``fedmeta simulate
    --resume``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        quiet_flower()
        run_cfg = cfg or config_for(context)
        again = resume if resume is not None else os.environ.get(RESUME_ENV) == "1"
        summary = run_server(grid, run_cfg, on_round, resume=again)
        if result is not None:
            result.update(summary)

    return app


app = make_server_app()
