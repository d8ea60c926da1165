"""Reptile's meta-step, stated once.

theta <- theta + beta_t * sum_i w_i (phi_i - theta),  w_i = n_i / sum_j n_j

The server strategy does not re-implement this: it is exactly Flower's
FedAvgM with ``server_learning_rate = beta_t`` and no momentum (the weighted
average of phi_i, then an SGD step on the pseudo-gradient theta - avg(phi)).
This module gives the schedule and a reference used by tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def beta_at(server_round: int, num_rounds: int, beta0: float, beta_final: float) -> float:
    """Linear annealing from ``beta0`` (round 1) to ``beta_final`` (last round)."""
    if num_rounds <= 1:
        return beta0
    frac = (server_round - 1) / (num_rounds - 1)
    return beta0 + (beta_final - beta0) * min(max(frac, 0.0), 1.0)


def reptile_update(
    theta: Sequence[np.ndarray],
    phis: Sequence[Sequence[np.ndarray]],
    weights: Sequence[float],
    beta: float,
) -> list[np.ndarray]:
    """Reference implementation of the meta-step (for tests and documentation)."""
    total = float(sum(weights))
    out = []
    for k, t in enumerate(theta):
        step = sum((w / total) * (phi[k] - t) for phi, w in zip(phis, weights, strict=True))
        out.append(t + beta * step)
    return out
