"""Reptile as a Flower strategy.

theta <- theta + beta_t * sum_i w_i (phi_i - theta), w_i by examples: this is
Flower's FedAvgM with ``server_learning_rate = beta_t`` and no momentum, so the
weighted aggregation and the server step are Flower's own. Reptile only
anneals beta linearly (``fedmeta.meta.reptile.beta_at``) and keeps the
server-side optimisation always on.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvgM

from fedmeta.meta.reptile import beta_at
from server.strategy.sites import SiteAwareMixin


class Reptile(SiteAwareMixin, FedAvgM):
    def __init__(
        self, *, beta0: float, beta_final: float, num_rounds: int, fraction_train: float = 1.0
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=0.0,
            server_learning_rate=beta0,
            server_momentum=0.0,
        )
        self.beta0, self.beta_final, self.num_rounds = beta0, beta_final, num_rounds
        self.server_opt = True  # also when beta == 1.0, so current_arrays tracks theta

    def before_send(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> None:
        beta = beta_at(server_round, self.num_rounds, self.beta0, self.beta_final)
        self.server_learning_rate = beta
        self.current_arrays = arrays  # theta of this round (FedAvgM steps from it)
        self.rounds[server_round].beta = beta
        config["beta"] = beta
