"""What both fedmeta strategies add to Flower's: sites, sampling, validation, audit.

The mixin composes three parts, each in its own module:

* ``SiteSampler`` (``sampler``): sites are known by their pseudonymous site id
  (learned once per run through a ``query`` message), so sampling is seeded and
  reproducible; waiting for nodes is bounded.
* ``ReplyClassifier`` (``replies``): every reply is classified before aggregation
  (lost, declined, dropped or used); only used replies reach Flower's aggregation.
* ``RoundObserver`` (``observer``): the round's audit entries and signed checkpoint.

It overrides Flower's ``configure_train`` (sampling by site id, the signed round start
in the config) and ``aggregate_train`` (classification first, then Flower's own).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING, getLogger

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedmeta.audit import AuditLog
from fedmeta.deploy.serverkey import ROUND_START_KEY
from server.strategy.observer import RoundObserver
from server.strategy.replies import ReplyClassifier
from server.strategy.roundlog import DETAILS_BUDGET, RoundLog, digest, outcome_details
from server.strategy.sampler import RunStopped, SiteSampler

__all__ = [
    "DETAILS_BUDGET",
    "RoundLog",
    "RunStopped",
    "SiteAwareMixin",
    "digest",
    "outcome_details",
]

log = getLogger(__name__).log


class SiteAwareMixin:
    """Mixed in front of a Flower strategy (``class X(SiteAwareMixin, FedAvg)``)."""

    fraction_train: float
    arrayrecord_key: str
    configrecord_key: str

    def setup_sites(
        self,
        *,
        sites: dict[int, str],
        seed: int,
        min_sites: int,
        node_wait_s: float,
        max_update_norm: float,
        audit: AuditLog | None = None,
        run_id: str = "-",
    ) -> None:
        self.site_of_node = dict(sites)
        self.sampler = SiteSampler(
            self.site_of_node,
            seed=seed,
            min_sites=min_sites,
            node_wait_s=node_wait_s,
            fraction_train=self.fraction_train,
        )
        self.classifier = ReplyClassifier(self.site_of_node, max_update_norm)
        self.observer = RoundObserver(audit, run_id)
        self.min_sites = min_sites
        self.rounds: dict[int, RoundLog] = {}
        self.theta: ArrayRecord | None = None
        self.stopped: str | None = None
        self._out: list[tuple[Message, str]] = []

    # the observer's state, as the run reads and restores it
    @property
    def audit(self) -> AuditLog | None:
        return self.observer.audit

    @audit.setter
    def audit(self, audit: AuditLog | None) -> None:
        self.observer.audit = audit

    @property
    def run_id(self) -> str:
        return self.observer.run_id

    @run_id.setter
    def run_id(self, run_id: str) -> None:
        self.observer.run_id = run_id

    @property
    def server_head(self) -> str:
        return self.observer.server_head

    @server_head.setter
    def server_head(self, head: str) -> None:
        self.observer.server_head = head

    # ---- sampling ------------------------------------------------------------
    def sample(self, server_round: int, grid: Grid) -> list[int]:
        return self.sampler.sample(server_round, grid)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        log_ = self.rounds.setdefault(server_round, RoundLog(server_round))
        self.theta = arrays
        if self.stopped:
            log_.stopped = self.stopped
            return []
        try:
            nodes = self.sample(server_round, grid)
        except RunStopped as exc:
            self.stopped = str(exc)
            log_.stopped = self.stopped
            log(WARNING, self.stopped)
            self.observer.run_stopped(server_round, self.stopped)
            return []
        log_.sampled = [self.site_of_node[n] for n in nodes]
        self.before_send(server_round, arrays, config)
        # durable before the messages leave; sent, signed, to the sites
        started = self.observer.round_started(server_round, arrays, log_, len(nodes))
        if started is not None:
            config[ROUND_START_KEY] = started
        config["server-round"] = server_round
        config["server-head"] = self.server_head
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        self._out = [
            (
                Message(content=record, message_type=MessageType.TRAIN, dst_node_id=n),
                self.site_of_node[n],
            )
            for n in nodes
        ]
        return [m for m, _ in self._out]

    def before_send(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> None:
        """Hook for subclasses (Reptile sets beta here)."""

    # ---- replies ---------------------------------------------------------------
    def classify(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Sort replies into lost / declined / dropped; return the usable ones."""
        log_ = self.rounds.setdefault(server_round, RoundLog(server_round))
        sent = {m.metadata.message_id: site for m, site in self._out}
        return self.classifier.classify(server_round, log_, replies, self.theta, sent)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        usable = self.classify(server_round, list(replies))
        log_ = self.rounds[server_round]
        arrays, metrics = None, None
        if len(usable) < self.min_sites and usable:
            log_.stopped = (
                f"round {server_round}: {len(usable)} usable replies, fewer than "
                f"the minimum of {self.min_sites}; not aggregated"
            )
            log(WARNING, log_.stopped)
        elif usable:
            arrays, metrics = super().aggregate_train(server_round, usable)  # type: ignore[misc]
        self.observer.round_ended(server_round, log_, self.theta, arrays)
        return arrays, metrics
