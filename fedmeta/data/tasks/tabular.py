"""``tabular-csv``: an institution's own tabular data, one CSV per site.

Each site keeps ``data.csv`` and ``schema.toml`` in its site directory (format:
``fedmeta.data.csv_loader``); the federation agrees on the number of feature
columns (``features``) and classes (``classes``) in the run config, so the
server can build the model (MLP features-32-classes) without seeing data. A
site is one task (as in ``breast-cancer-sites``); the server holds no data, so
evaluation happens at the sites, not at the server.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from fedmeta.data.records import Records
from fedmeta.data.tasks.base import Episode, Pool, Split, Task, TaskError
from fedmeta.meta.models import MLP

DATA_FILE = "data.csv"
SCHEMA_FILE = "schema.toml"


class TabularCsv(Task):
    name = "tabular-csv"
    kind = "classification"
    server_eval = False

    def __init__(self, n_way: int = 2, pool_per_class: int = 40, num_sites: int = 10,
                 num_features: int = 0, num_classes: int = 2) -> None:
        super().__init__(n_way, pool_per_class, num_sites)
        if num_features < 1:
            raise TaskError("option 'features': tabular-csv needs the number of feature "
                            "columns the federation agreed on (e.g. --set features=3)")
        self.num_features = num_features
        self.num_classes = num_classes

    def build_model(self, out_dim: int) -> nn.Module:
        return MLP(self.num_features, (32,), out_dim)

    def meta_out_dim(self) -> int:
        return self.num_classes

    def site_records(self, site: int) -> Records:
        raise TaskError(f"tabular-csv: a site reads its own {DATA_FILE} and {SCHEMA_FILE} "
                        "from its site directory; none was found")

    def check(self, records: Records) -> None:
        if records.x.shape[1] != self.num_features:
            raise TaskError(f"{DATA_FILE}: {records.x.shape[1]} feature columns, the run "
                            f"expects {self.num_features}")
        if len(records) and (records.y.min() < 0 or records.y.max() >= self.num_classes):
            raise TaskError(f"{DATA_FILE}: labels outside 0..{self.num_classes - 1}")

    def episode_pool(self, records: Records, rng: np.random.Generator) -> Pool:
        if len(records) < 2:
            raise TaskError("fewer than 2 usable records")
        return Pool(records.x, records.y, records.units)

    def eval_episode(self, split: Split, rng: np.random.Generator, shots: int,
                     query: int) -> Episode:
        raise TaskError("tabular-csv has no held-out data at the server")
