"""fedmeta: privacy-preserving federated meta-learning.

The Python API (docs/api.md)::

    import fedmeta
    result = fedmeta.simulate({"task": "sine", "rounds": 5}, backend="inline",
                              out_dir="runs/sine")

Public names are loaded on first use, so ``import fedmeta`` stays cheap (the
command line and the site's ClientApp import submodules only). Reports:
``fedmeta.report.write_report(run_dir, "html")`` (``fedmeta.report`` is the report
package; ``fedmeta.api.report`` is the same with keyword arguments).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedmeta.layout import protect as _protect  # a user's server.py/policies/ never shadow ours

_protect()

#: public name -> the module that defines it
_PUBLIC = {
    "simulate": "fedmeta.api",
    "evaluate": "fedmeta.api",
    "RunResult": "fedmeta.api",
    "RunFailed": "fedmeta.api",
    "Failure": "fedmeta.api",
    "RoundMetrics": "fedmeta.rounds",
    "EvalMetrics": "fedmeta.rounds",
    "RunConfig": "fedmeta.config",
    "ConfigError": "fedmeta.config",
    "TensorBoardTracker": "fedmeta.tracking",
    "MLflowTracker": "fedmeta.tracking",
    "adapt": "fedmeta.newsite",
    "predict": "fedmeta.newsite",
}
__all__ = [
    "ConfigError",
    "EvalMetrics",
    "Failure",
    "MLflowTracker",
    "RoundMetrics",
    "RunConfig",
    "RunFailed",
    "RunResult",
    "TensorBoardTracker",
    "adapt",
    "evaluate",
    "predict",
    "simulate",
]

if TYPE_CHECKING:  # pragma: no cover
    from fedmeta.api import Failure, RunFailed, RunResult, evaluate, simulate
    from fedmeta.config import ConfigError, RunConfig
    from fedmeta.newsite import adapt, predict
    from fedmeta.rounds import EvalMetrics, RoundMetrics
    from fedmeta.tracking import MLflowTracker, TensorBoardTracker


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'fedmeta' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
