"""``breast-cancer-sites``: scikit-learn's bundled breast-cancer data over sites.

Records are standardised, then dealt to ``num_sites`` training sites plus four
held-out sites (two validation, two test) with site-specific covariate shift:
each site prefers patients along its own random direction in feature space and
has its own measurement calibration (per-feature scale and offset). A site is
one task; evaluation adapts on K labelled patients per class at an unseen site.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from torch import nn

from fedmeta.data.records import Records
from fedmeta.data.tasks.base import Episode, Pool, Split, Task, TaskError
from fedmeta.meta.models import MLP

DATA_SEED = 0
HELD_OUT = {"val": (0, 1), "test": (2, 3)}
SHIFT = 1.5


@cache
def _partition(num_sites: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Per site (training sites first, then 4 held-out) its (x, y)."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    x = bunch.data.astype(np.float64)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    y = bunch.target.astype(np.int64)
    total = num_sites + 4
    rng = np.random.default_rng(DATA_SEED)
    directions = rng.normal(size=(total, x.shape[1]))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    logits = SHIFT * x @ directions.T
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    owner = np.array([rng.choice(total, p=p) for p in probs])
    out = []
    for s in range(total):
        sel = np.flatnonzero(owner == s)
        scale = rng.uniform(0.8, 1.2, size=x.shape[1]).astype(np.float32)
        offset = rng.normal(0, 0.3, size=x.shape[1]).astype(np.float32)
        out.append((x[sel] * scale + offset, y[sel]))
    return tuple(out)


class BreastCancerSites(Task):
    name = "breast-cancer-sites"
    kind = "classification"

    def build_model(self, out_dim: int) -> nn.Module:
        return MLP(30, (32,), out_dim)

    def meta_out_dim(self) -> int:
        return 2

    def site_records(self, site: int) -> Records:
        num_sites = self.num_sites
        if not 0 <= site < num_sites:
            raise TaskError(f"site index {site} outside 0..{num_sites - 1}")
        x, y = _partition(num_sites)[site]
        if len(y) < 4:
            raise TaskError(f"site {site} has only {len(y)} records; use fewer sites")
        return Records(
            x=x,
            y=y,
            groups=np.zeros(len(y), dtype=np.int64),
            record_ids=np.array([f"bc-{site}-{i}" for i in range(len(y))]),
        )

    def episode_pool(self, records: Records, rng: np.random.Generator) -> Pool:
        return Pool(records.x, records.y, records.units)

    def eval_episode(
        self, split: Split, rng: np.random.Generator, shots: int, query: int
    ) -> Episode:
        x, y = _partition(self.num_sites)[self.num_sites + int(rng.choice(HELD_OUT[split]))]
        sup, qry = [], []
        for c in (0, 1):
            members = rng.permutation(np.flatnonzero(y == c))
            take = min(shots, max(1, len(members) - 1))
            sup.append(members[:take])
            qry.append(members[take : take + query])
        s, q = np.concatenate(sup), np.concatenate(qry)
        return Episode(x[s], y[s], x[q], y[q])
