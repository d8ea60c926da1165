"""First-order MAML as a Flower strategy.

Each site replies ``theta - g`` (``fedmeta.meta.fomaml``: g is the gradient at
its adapted weights on a held-out part of its episode), so Reptile's server
step, Flower's FedAvgM with ``server_learning_rate = beta_t`` and no momentum,
is FOMAML's outer SGD step:

    theta <- theta + beta_t * sum_i w_i ((theta - g_i) - theta) = theta - beta_t * sum_i w_i g_i.

The aggregation and the server step stay Flower's own; beta anneals as in
Reptile (``meta-lr`` to ``meta-lr-final``) and is FOMAML's outer learning rate.
"""

from __future__ import annotations

from server.strategy.reptile import Reptile


class FOMAML(Reptile):
    """Reptile's server step over FOMAML site updates (outer learning rate beta_t)."""
