"""``blobs-fewshot``: N-way few-shot classification of synthetic Gaussian blobs.

32 classes, each a Gaussian around its own centre in 16 dimensions; 20 classes
are split over the training sites (each class held by two sites), 6 are for
validation and 6 for test. A round trains on every record of ``n_way`` of the
site's classes (labels re-assigned per episode); evaluation draws N-way K-shot
episodes from the held-out classes. No files, no downloads.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from torch import nn

from fedmeta.data.records import Records
from fedmeta.data.tasks.base import Episode, Pool, Split, Task, TaskError
from fedmeta.meta.models import MLP

DIM, CLASSES, PER_CLASS = 16, 32, 40
SPLITS = {"train": range(0, 20), "val": range(20, 26), "test": range(26, 32)}


@cache
def _blobs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.normal(0.0, 1.0, size=(CLASSES, DIM))
    x = np.concatenate([c + 0.6 * rng.normal(size=(PER_CLASS, DIM)) for c in centres])
    y = np.repeat(np.arange(CLASSES), PER_CLASS)
    return x.astype(np.float32), y.astype(np.int64)


class BlobsFewShot(Task):
    name = "blobs-fewshot"
    kind = "classification"

    def build_model(self, out_dim: int) -> nn.Module:
        return MLP(DIM, (32,), out_dim)

    def input_shape(self) -> tuple[int, ...]:
        return (DIM,)

    def site_records(self, site: int) -> Records:
        if not 0 <= site < self.num_sites:
            raise TaskError(f"site index {site} outside 0..{self.num_sites - 1}")
        x, y = _blobs()
        mine = [
            c for c in SPLITS["train"] if site in {c % self.num_sites, (c + 1) % self.num_sites}
        ]
        idx = np.flatnonzero(np.isin(y, mine))
        return Records(
            x=x[idx], y=y[idx], groups=y[idx], record_ids=np.array([f"blob-{i}" for i in idx])
        )

    def episode_pool(self, records: Records, rng: np.random.Generator) -> Pool:
        classes = np.unique(records.groups)
        if len(classes) < self.n_way:
            raise TaskError(f"only {len(classes)} classes here, n-way={self.n_way}")
        chosen = rng.choice(classes, size=self.n_way, replace=False)
        label = np.full(len(records), -1, dtype=np.int64)
        for i, c in enumerate(chosen):
            label[records.groups == c] = i
        keep = label >= 0
        return Pool(records.x[keep], label[keep])

    def eval_episode(
        self, split: Split, rng: np.random.Generator, shots: int, query: int
    ) -> Episode:
        x, y = _blobs()
        chosen = rng.choice(np.array(SPLITS[split]), size=self.n_way, replace=False)
        sx, sy, qx, qy = [], [], [], []
        for label, c in enumerate(chosen):
            members = rng.permutation(np.flatnonzero(y == c))[: shots + query]
            sx.append(x[members[:shots]])
            qx.append(x[members[shots:]])
            sy.append(np.full(shots, label))
            qy.append(np.full(len(members) - shots, label))
        return Episode(
            np.concatenate(sx),
            np.concatenate(sy).astype(np.int64),
            np.concatenate(qx),
            np.concatenate(qy).astype(np.int64),
        )
