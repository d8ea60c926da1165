"""Experiment tracking through the round callback: TensorBoard and MLflow (optional extras).

Both are plain round callbacks (``on_round``): each round's finite scalars
(:meth:`fedmeta.rounds.RoundMetrics.scalars`: sites used/declined/lost,
examples, beta, the meta-evaluation, each site's epsilon) go to the tracker
with the round as step. Nothing else leaves: the metrics are the same
privatised figures ``metrics.jsonl`` holds.

    pip install 'fedmeta[tensorboard]'   # or 'fedmeta[mlflow]'
    fedmeta simulate --tensorboard runs/tb --mlflow sqlite:///mlflow.db ...
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

from fedmeta.rounds import RoundMetrics


class TrackingError(ImportError):
    """A tracker's package is not installed (one line, names the extra)."""


def _need(module: str, extra: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TrackingError(f"{module} is not installed; pip install 'fedmeta[{extra}]'") from None


class TensorBoardTracker:
    """Writes each round's scalars to a TensorBoard event file under ``logdir``."""

    def __init__(self, logdir: str | Path) -> None:
        _need("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(logdir))

    def __call__(self, metrics: RoundMetrics) -> None:
        for name, value in metrics.scalars().items():
            self.writer.add_scalar(name, value, global_step=metrics.round)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowTracker:
    """Logs each round's scalars to an MLflow run (started on the first round, tagged with
    fedmeta's run id). ``mlflow``: the module to use (default: ``import mlflow``)."""

    def __init__(
        self, tracking_uri: str | None = None, experiment: str = "fedmeta", mlflow: Any = None
    ) -> None:
        self.mlflow = mlflow if mlflow is not None else _need("mlflow", "mlflow")
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.active: Any = None

    def __call__(self, metrics: RoundMetrics) -> None:
        mlflow = self.mlflow
        if self.active is None:
            if self.tracking_uri:
                mlflow.set_tracking_uri(self.tracking_uri)
            mlflow.set_experiment(self.experiment)
            self.active = mlflow.start_run(run_name=metrics.run)
            mlflow.set_tag("fedmeta.run", metrics.run)
        safe = {name.replace("/", "."): value for name, value in metrics.scalars().items()}
        mlflow.log_metrics(safe, step=metrics.round)

    def close(self) -> None:
        if self.active is not None:
            self.mlflow.end_run()
            self.active = None
