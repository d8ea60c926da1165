"""The transfer-learning baseline: classic FedAvg (plain weighted averaging)."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from server.strategy.sites import SiteAwareMixin


class FedAvgBaseline(SiteAwareMixin, FedAvg):
    def __init__(self, *, fraction_train: float = 1.0) -> None:
        super().__init__(fraction_train=fraction_train, fraction_evaluate=0.0)
