"""``sine``: the Reptile paper's sinusoid regression.

A task is y = A sin(x + phi), A ~ U[0.1, 5], phi ~ U[0, pi], x ~ U[-5, 5];
model 1-64-64-1. Each site has its own task distribution (its own amplitude
band) and holds a few sinusoids with a fixed number of points each; one
sinusoid (all its points) is one episode. Evaluation draws fresh sinusoids from the full range.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from fedmeta.data.records import Records
from fedmeta.data.tasks.base import Episode, Pool, Split, Task, TaskError
from fedmeta.meta.models import MLP

DATA_SEED = 0
AMP = (0.1, 5.0)
PHASE = (0.0, np.pi)
X_RANGE = (-5.0, 5.0)


def _points(rng: np.random.Generator, amp: float, phase: float, n: int) -> tuple:
    x = rng.uniform(*X_RANGE, size=(n, 1)).astype(np.float32)
    return x, (amp * np.sin(x + phase)).astype(np.float32)


class Sine(Task):
    name = "sine"
    kind = "regression"
    default_inner_lr = 0.01
    default_adapt_lr = 0.01
    functions_per_site = 10

    def build_model(self, out_dim: int) -> nn.Module:
        return MLP(1, (64, 64), out_dim)

    def site_records(self, site: int) -> Records:
        num_sites = self.num_sites
        if not 0 <= site < num_sites:
            raise TaskError(f"site index {site} outside 0..{num_sites - 1}")
        rng = np.random.default_rng([DATA_SEED, site])
        # the site's own task distribution: an amplitude band of half the full range
        width = (AMP[1] - AMP[0]) / 2
        lo = AMP[0] + (AMP[1] - AMP[0] - width) * site / max(1, num_sites - 1)
        n = max(2, self.pool_per_class)
        xs, ys, groups = [], [], []
        for f in range(self.functions_per_site):
            x, y = _points(rng, rng.uniform(lo, lo + width), rng.uniform(*PHASE), n)
            xs.append(x)
            ys.append(y)
            groups.append(np.full(n, f))
        g = np.concatenate(groups)
        return Records(
            x=np.concatenate(xs),
            y=np.concatenate(ys),
            groups=g,
            record_ids=np.array([f"sine-{site}-{i}" for i in range(len(g))]),
        )

    def episode_pool(self, records: Records, rng: np.random.Generator) -> Pool:
        """Every point of one of the site's sinusoids (chosen from the site's groups alone).

        No point is sub-sampled: each step's batch is the DP trainer's Poisson
        sample of this pool (docs/privacy-accounting.md).
        """
        g = rng.choice(np.unique(records.groups))
        members = np.flatnonzero(records.groups == g)
        units = None if records.units is None else records.units[members]
        return Pool(records.x[members], records.y[members], units)

    def eval_episode(
        self, split: Split, rng: np.random.Generator, shots: int, query: int
    ) -> Episode:
        amp, phase = rng.uniform(*AMP), rng.uniform(*PHASE)
        sx, sy = _points(rng, amp, phase, shots)
        qx = np.linspace(*X_RANGE, max(query, 50), dtype=np.float32)[:, None]
        return Episode(sx, sy, qx, (amp * np.sin(qx + phase)).astype(np.float32))
