"""``digits-fewshot``: scikit-learn's bundled digits x 4 rotations = 40 classes.

Classes are split once (fixed split seed) into 24 meta-training, 6 validation
and 10 test classes. Each training class is held by a few sites (non-IID:
every site sees only a subset of classes, records of a class are divided
between its holders). A Reptile round draws N of the site's classes and
trains on all their records (labels re-assigned per episode; the DP trainer's
Poisson sampling picks each step's batch); evaluation draws N-way K-shot
episodes from the held-out classes.

The privacy unit is the original image: its 4 rotations (which fall in 4
different classes, possibly at one site) share one unit id, so DP-SGD samples
and clips them together and the ledger's epsilon protects the image.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from torch import nn

from fedmeta.data.records import Records
from fedmeta.data.tasks.base import Episode, Pool, Split, Task, TaskError
from fedmeta.meta.models import SmallCNN

SPLIT_SEED = 0
N_CLASSES = 40
N_TEST, N_VAL = 10, 6


@cache
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 7188 images (float32 [n,1,8,8] in [0,1]) and class ids 0..39."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0
    xs, ys = [], []
    for r in range(4):
        xs.append(np.rot90(images, k=r, axes=(1, 2)))
        ys.append(bunch.target.astype(np.int64) + 10 * r)
    x = np.ascontiguousarray(np.concatenate(xs)[:, None, :, :])
    return x, np.concatenate(ys)


@cache
def class_split() -> dict[str, tuple[int, ...]]:
    perm = np.random.default_rng(SPLIT_SEED).permutation(N_CLASSES)
    return {
        "test": tuple(sorted(int(c) for c in perm[:N_TEST])),
        "val": tuple(sorted(int(c) for c in perm[N_TEST : N_TEST + N_VAL])),
        "train": tuple(sorted(int(c) for c in perm[N_TEST + N_VAL :])),
    }


class DigitsFewShot(Task):
    name = "digits-fewshot"
    kind = "classification"
    #: what ``Records.units`` names: the original image of each rotated record
    privacy_unit = "image"

    def build_model(self, out_dim: int) -> nn.Module:
        return SmallCNN(out_dim)

    def supervised_out_dim(self) -> int:
        return len(class_split()["train"])

    def holders(self, num_sites: int) -> dict[int, list[int]]:
        """Training class -> the sites holding part of its records."""
        train = class_split()["train"]
        copies = min(num_sites, max(1, math.ceil(self.n_way * num_sites / len(train))))
        order = np.random.default_rng(SPLIT_SEED + 1).permutation(len(train))
        return {
            train[j]: sorted({(pos * copies + t) % num_sites for t in range(copies)})
            for pos, j in enumerate(order)
        }

    def site_records(self, site: int) -> Records:
        num_sites = self.num_sites
        if not 0 <= site < num_sites:
            raise TaskError(f"site index {site} outside 0..{num_sites - 1}")
        x, y = _all_digits()
        rng = np.random.default_rng(SPLIT_SEED + 2)
        idx: list[np.ndarray] = []
        for cls, sites in sorted(self.holders(num_sites).items()):
            members = rng.permutation(np.flatnonzero(y == cls))
            if site in sites:
                idx.append(np.array_split(members, len(sites))[sites.index(site)])
        if len(idx) < self.n_way:
            raise TaskError(
                f"site {site} holds {len(idx)} classes, fewer than n-way={self.n_way}; "
                "lower n-way or the number of sites"
            )
        sel = np.sort(np.concatenate(idx))
        return Records(
            x=x[sel],
            y=y[sel],
            groups=y[sel],
            record_ids=np.array([f"digit-{i}" for i in sel]),
            units=(sel % (len(x) // 4)).astype(np.int64),  # row i: image i % n, rotated
        )

    def episode_pool(self, records: Records, rng: np.random.Generator) -> Pool:
        """Every record of ``n_way`` classes drawn from the site's classes.

        No record is sub-sampled here: which records a step trains on is
        decided by the DP trainer's Poisson sampling over this pool, so a
        record's presence never changes which other records are used (the
        neighbouring relation the privacy accountant assumes; see
        docs/privacy-accounting.md). The classes are drawn from the site's
        label set alone, not from its records.
        """
        classes, counts = np.unique(records.groups, return_counts=True)
        if len(classes) < self.n_way:
            raise TaskError(f"only {len(classes)} classes usable here, n-way={self.n_way}")
        if counts.min() < 2:
            raise TaskError("a class at this site has fewer than 2 usable records")
        chosen = rng.choice(classes, size=self.n_way, replace=False)
        label = np.full(len(records), -1, dtype=np.int64)
        for i, cls in enumerate(chosen):
            label[records.groups == cls] = i
        members = np.flatnonzero(label >= 0)
        units = None if records.units is None else records.units[members]
        return Pool(records.x[members], label[members], units)

    def supervised_pool(self, records: Records) -> Pool:
        index = {c: i for i, c in enumerate(class_split()["train"])}
        return Pool(
            records.x, np.array([index[int(c)] for c in records.y], dtype=np.int64), records.units
        )

    def eval_episode(
        self, split: Split, rng: np.random.Generator, shots: int, query: int
    ) -> Episode:
        x, y = _all_digits()
        chosen = rng.choice(class_split()[split], size=self.n_way, replace=False)
        parts: dict[str, list[np.ndarray]] = {"sx": [], "sy": [], "qx": [], "qy": []}
        for label, cls in enumerate(chosen):
            members = rng.permutation(np.flatnonzero(y == cls))[: shots + query]
            parts["sx"].append(x[members[:shots]])
            parts["qx"].append(x[members[shots:]])
            parts["sy"].append(np.full(shots, label, dtype=np.int64))
            parts["qy"].append(np.full(len(members) - shots, label, dtype=np.int64))
        return Episode(*(np.concatenate(parts[k]) for k in ("sx", "sy", "qx", "qy")))
