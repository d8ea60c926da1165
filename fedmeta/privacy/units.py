"""Privacy units: the records of one person (or image, subject ...) enter and are clipped together.

With a declared unit (``Pool.units``: a patient id per record, the original
image of an augmented record), DP-SGD protects the unit, not the row:

* **sampling over units**: each step includes every *unit* of the pool
  independently with probability ``q = 1 / ceil(U / B)`` (``U`` units in the
  pool, ``B`` the expected number of units per batch) and takes all of its
  pool records;
* **clipping per unit**: a unit's gradient is the *sum* of its records'
  per-sample gradients, clipped to ``C`` as a whole, so adding or removing one
  unit (all its records) moves the clipped sum by at most ``C``;
* the noisy sum is divided by the expected number of units per batch.

Without units every record is its own unit and all of this reduces to
ordinary per-record DP-SGD. Ghost clipping computes per-record norms inside
its backward pass and cannot sum by unit first: it is refused with units.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

RECORD = "record"
"""The unit named when a site's data declares none: each record (row) is one."""


class UnitError(ValueError):
    """Units cannot be used as asked (one line, names the fix)."""


def unit_index(units: np.ndarray | None, n_records: int) -> tuple[np.ndarray, int]:
    """(each record's unit as 0..U-1, U). Without units each record is its own unit."""
    if units is None:
        return np.arange(n_records, dtype=np.int64), n_records
    units = np.asarray(units)
    if len(units) != n_records:
        raise UnitError(f"units has {len(units)} rows for {n_records} records")
    if n_records == 0:
        return np.zeros(0, dtype=np.int64), 0
    _, inverse = np.unique(units, return_inverse=True)
    inverse = inverse.astype(np.int64).reshape(n_records)
    return inverse, int(inverse.max()) + 1


def count_units(units: np.ndarray | None, n_records: int) -> int:
    """How many privacy units ``n_records`` records with ``units`` hold."""
    return n_records if units is None else len(np.unique(np.asarray(units)))


def check_mode(mode: str) -> str:
    """``mode`` if it can clip per unit, else UnitError naming the modes that can."""
    if mode == "ghost":
        raise UnitError(
            "grad-sample-mode 'ghost' clips each record inside its backward pass "
            "and cannot clip a privacy unit's summed gradient; use 'auto', 'bk', "
            "'hooks' or 'ew'"
        )
    return mode


class UnitPoissonSampler(Sampler[list[int]]):
    """Poisson sampling over units: each unit joins a step with probability ``q``, with
    all of its records. ``draw(m)`` returns ``m`` uniforms in [0, 1] (a site keystream or
    a seeded torch generator); one batch of record indices per step, possibly empty."""

    def __init__(
        self,
        unit_of_record: np.ndarray,
        n_units: int,
        sample_rate: float,
        draw: Callable[[int], np.ndarray],
    ) -> None:
        self.unit_of_record = np.asarray(unit_of_record, dtype=np.int64)
        self.n_units = int(n_units)
        self.sample_rate = float(sample_rate)
        self.draw = draw
        self.steps = int(round(1 / sample_rate))

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for records, _, _ in self.batches():
            yield records.tolist()

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray | None, int]]:
        """Per step: (the batch's record indices, each record's unit within the batch as
        0..U_b-1 in unit order, or None when every unit drew one record; U_b).

        The same draws as iterating the sampler; the labels are what ``batch_units``
        computes from the records' unit ids, found from the draw instead.
        """
        for _ in range(self.steps):
            chosen = self.draw(self.n_units) < self.sample_rate
            records = np.flatnonzero(chosen[self.unit_of_record])
            n_batch_units = int(np.count_nonzero(chosen))
            if n_batch_units == len(records):
                yield records, None, n_batch_units
                continue
            rank = np.cumsum(chosen) - 1  # a chosen unit's place among the chosen
            yield records, rank[self.unit_of_record[records]], n_batch_units


def torch_draw(generator: torch.Generator) -> Callable[[int], np.ndarray]:
    """Uniforms from a seeded torch generator (simulations), as Opacus's sampler draws them."""
    return lambda m: torch.rand(m, generator=generator).numpy()


def batch_units(unit_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(each batch record's unit as 0..U_b-1, U_b) for the records of one batch."""
    if unit_ids.numel() == 0:
        return unit_ids.to(torch.int64), 0
    _, inverse = torch.unique(unit_ids, return_inverse=True)
    return inverse, int(inverse.max()) + 1


def sum_grad_samples(params: list[torch.nn.Parameter], unit: torch.Tensor, n_units: int) -> None:
    """Replace each ``p.grad_sample`` [B, ...] by its per-unit sums [U_b, ...] (Opacus modes),
    so that Opacus's optimizer clips each unit's summed gradient to C."""
    for p in params:
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            continue
        if isinstance(gs, list):  # accumulation is impossible under Poisson sampling
            raise UnitError(
                "per-sample gradients were accumulated over several batches; "
                "call zero_grad every step"
            )
        summed = gs.new_zeros((n_units, *gs.shape[1:]))
        p.grad_sample = summed.index_add_(0, unit, gs)
