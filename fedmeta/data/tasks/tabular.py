"""``tabular-csv``: an institution's own tabular data, one CSV per site.

Each site keeps ``data.csv`` and ``schema.toml`` in its site directory (format:
``fedmeta.data.csv_loader``); the federation agrees on the number of feature
columns (``features``) and classes (``classes``) in the run config, so the
server can build the model (MLP features-32-classes) without seeing data. A
site is one task (as in ``breast-cancer-sites``).

Evaluation is leave-sites-out: in a simulation whose ``data-dir`` holds more
site folders than training sites (``site-<sites>``, ``site-<sites+1>``, ...),
those extra sites never train; each evaluation episode adapts on K labelled
records per class of one of them and is scored on others of the same site. The
first half of the held-out sites are validation sites, the rest test sites
(one held-out site serves both). Without held-out sites the server holds no
data and does not evaluate.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

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

    def __init__(
        self,
        n_way: int = 2,
        pool_per_class: int = 40,
        num_sites: int = 10,
        num_features: int = 0,
        num_classes: int = 2,
        data_dir: str = "",
    ) -> None:
        super().__init__(n_way, pool_per_class, num_sites)
        if num_features < 1:
            raise TaskError(
                "option 'features': tabular-csv needs the number of feature "
                "columns the federation agreed on (e.g. --set features=3)"
            )
        self.num_features = num_features
        self.num_classes = num_classes
        self.data_dir = data_dir
        self.server_eval = bool(self.held_out_sites())

    def input_shape(self) -> tuple[int, ...]:
        return (self.num_features,)

    def held_out_sites(self) -> list[Path]:
        """Site folders of ``data-dir`` beyond the training sites (never trained on)."""
        if not self.data_dir:
            return []
        out, i = [], self.num_sites
        while (Path(self.data_dir) / f"site-{i}").is_dir():
            out.append(Path(self.data_dir) / f"site-{i}")
            i += 1
        return out

    def held_out_split(self, split: Split) -> list[Path]:
        sites = self.held_out_sites()
        if not sites:
            raise TaskError(
                "tabular-csv has no held-out sites to evaluate on: put site "
                f"folders site-{self.num_sites}, ... beside the training sites "
                "in data-dir (leave-sites-out)"
            )
        half = max(1, len(sites) // 2)
        return sites[:half] if split == "val" or len(sites) == 1 else sites[half:]

    @cached_property
    def _held_out_records(self) -> dict[Path, Records]:
        return {folder: self._load(folder) for folder in self.held_out_sites()}

    def _load(self, folder: Path) -> Records:
        """A site folder's data.csv (schema.toml beside it), checked against the run."""
        from fedmeta.data.loaders import DataError, load_tabular

        try:
            records = load_tabular(folder).records
        except DataError as exc:
            raise TaskError(f"{folder.name}/{exc}") from None
        self.check(records)
        return records

    def build_model(self, out_dim: int) -> nn.Module:
        return MLP(self.num_features, (32,), out_dim)

    def meta_out_dim(self) -> int:
        return self.num_classes

    def site_records(self, site: int) -> Records:
        folder = Path(self.data_dir) / f"site-{site}" if self.data_dir else None
        if folder is not None and folder.is_dir():
            return self._load(folder)
        raise TaskError(
            f"tabular-csv: a site reads its own {DATA_FILE} and {SCHEMA_FILE} "
            "from its site directory; none was found"
        )

    def check(self, records: Records) -> None:
        if records.x.shape[1] != self.num_features:
            raise TaskError(
                f"{DATA_FILE}: {records.x.shape[1]} feature columns, the run "
                f"expects {self.num_features}"
            )
        if len(records) and (records.y.min() < 0 or records.y.max() >= self.num_classes):
            raise TaskError(f"{DATA_FILE}: labels outside 0..{self.num_classes - 1}")

    def episode_pool(self, records: Records, rng: np.random.Generator) -> Pool:
        if len(records) < 2:
            raise TaskError("fewer than 2 usable records")
        return Pool(records.x, records.y, records.units)

    def eval_episode(
        self, split: Split, rng: np.random.Generator, shots: int, query: int
    ) -> Episode:
        """K labelled records per class of one held-out site, scored on up to ``query``
        other records per class of the same site."""
        folder = self.held_out_split(split)[int(rng.integers(len(self.held_out_split(split))))]
        records = self._held_out_records[folder]
        sup, qry = [], []
        for c in np.unique(records.y):
            members = rng.permutation(np.flatnonzero(records.y == c))
            take = min(shots, max(1, len(members) - 1))
            sup.append(members[:take])
            qry.append(members[take : take + query])
        s, q = np.concatenate(sup), np.concatenate(qry)
        return Episode(records.x[s], records.y[s], records.x[q], records.y[q])
