"""Budget arithmetic on top of Opacus's accountants (nothing re-implemented).

A site's whole privacy history is a list of ``(noise_multiplier, sample_rate,
steps)`` — exactly Opacus's accountant ``history``. Composition does not depend
on order, so equal ``(sigma, q)`` entries are merged before an accountant is
asked (PRV's cost grows with distinct entries; see shared OPACUS-NOTES).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import lru_cache

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

Step = tuple[float, float, int]


def compact(history: Iterable[Step]) -> list[Step]:
    """Merge entries with equal (sigma, q); order-independent, same epsilon."""
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in history:
        if steps:
            merged[(float(sigma), float(q))] = merged.get((float(sigma), float(q)), 0) + int(steps)
    return [(s, q, n) for (s, q), n in sorted(merged.items())]


def epsilon(history: Iterable[Step], delta: float, accountant: str = "prv") -> float:
    """Cumulative epsilon of ``history`` at ``delta`` (0.0 for an empty history)."""
    return _epsilon(tuple(compact(history)), float(delta), accountant)


@lru_cache(maxsize=256)
def _epsilon(history: tuple[Step, ...], delta: float, accountant: str) -> float:
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    acc = create_accountant(accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


@lru_cache(maxsize=64)
def noise_for_target(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """Noise multiplier that spends ``target_epsilon`` over ``steps`` steps at rate ``q``."""
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    )


def poisson_rate(n_records: int, batch_size: int) -> float:
    """The per-record Poisson rate Opacus uses for ``n`` records at an expected batch ``B``.

    Opacus sets q = 1 / len(DataLoader) = 1 / ceil(n / B).
    """
    if n_records <= 0:
        raise ValueError("no records to sample from")
    return 1.0 / math.ceil(n_records / batch_size)


def expected_batch_size(n_records: int, batch_size: int) -> int:
    """E[B] = n * q for Opacus's q = 1 / ceil(n / B), in integer arithmetic (>= 1).

    The DP optimizer divides the noisy clipped sum by it; ``int(n * q)`` in
    floating point can be 0 (n = 49, B = 1 gives 0.999...), which made NaN weights.
    """
    if n_records <= 0 or batch_size <= 0:
        raise ValueError(f"expected batch size: {n_records} records at batch size {batch_size}; "
                         "a DP round needs at least one record and batch-size >= 1")
    expected = n_records // math.ceil(n_records / batch_size)
    if expected < 1:  # pragma: no cover - n // ceil(n / B) >= 1 whenever n, B >= 1
        raise ValueError(f"expected batch size {expected} < 1 for {n_records} records; "
                         "raise batch-size")
    return expected
