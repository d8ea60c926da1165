"""What both fedmeta strategies add to Flower's: sites, sampling, validation.

* Sites are known by their pseudonymous site id (learned once per run through
  a ``query`` message), so sampling is seeded and reproducible.
* Waiting for nodes is bounded (Flower's ``sample_nodes`` waits forever).
* Every reply is classified before aggregation: lost (error reply or no
  reply), declined (budget, policy), dropped (fails validation), or used.
  Only used replies reach Flower's aggregation, so a round where every site
  declines aggregates nothing instead of dividing by zero.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedmeta.meta.updates import check_update


@dataclass
class RoundLog:
    """What happened in one round, as written to metrics.jsonl."""

    round: int
    sampled: list[str] = field(default_factory=list)
    used: list[str] = field(default_factory=list)
    declined: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    lost: dict[str, str] = field(default_factory=dict)
    examples: int = 0
    train_loss: float | None = None
    epsilon: dict[str, float] = field(default_factory=dict)
    epsilon_round: dict[str, float] = field(default_factory=dict)
    dp: dict[str, bool] = field(default_factory=dict)
    beta: float | None = None
    stopped: str | None = None


class RunStopped(RuntimeError):
    """The run cannot continue (e.g. fewer sites than the declared minimum)."""


class SiteAwareMixin:
    """Mixed in front of a Flower strategy (``class X(SiteAwareMixin, FedAvg)``)."""

    def setup_sites(self, *, sites: dict[int, str], seed: int, min_sites: int,
                    node_wait_s: float, max_update_norm: float) -> None:
        self.site_of_node = dict(sites)
        self.sample_seed = seed
        self.min_sites = min_sites
        self.node_wait_s = node_wait_s
        self.max_update_norm = max_update_norm
        self.rounds: dict[int, RoundLog] = {}
        self.theta: ArrayRecord | None = None
        self.stopped: str | None = None

    # ---- sampling ------------------------------------------------------------
    def available_nodes(self, grid: Grid, needed: int) -> list[int]:
        """Known nodes that are connected, waiting at most ``node_wait_s`` for ``needed``."""
        deadline = time.monotonic() + self.node_wait_s
        while True:
            nodes = [n for n in grid.get_node_ids() if n in self.site_of_node]
            if len(nodes) >= needed or time.monotonic() >= deadline:
                return nodes
            time.sleep(0.5)

    def sample(self, server_round: int, grid: Grid) -> list[int]:
        n_known = len(self.site_of_node)
        wanted = max(self.min_sites, int(round(n_known * self.fraction_train)))
        nodes = self.available_nodes(grid, min(wanted, n_known))
        if len(nodes) < self.min_sites:
            raise RunStopped(f"round {server_round}: {len(nodes)} site(s) connected, fewer than "
                             f"the declared minimum of {self.min_sites}; stopping the run")
        ordered = sorted(nodes, key=lambda n: self.site_of_node[n])
        rng = random.Random(f"{self.sample_seed}:{server_round}")
        chosen = rng.sample(ordered, min(wanted, len(ordered)))
        return sorted(chosen, key=lambda n: self.site_of_node[n])

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
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
            return []
        log_.sampled = [self.site_of_node[n] for n in nodes]
        self.before_send(server_round, arrays, config)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        self._out = [(Message(content=record, message_type=MessageType.TRAIN, dst_node_id=n),
                      self.site_of_node[n]) for n in nodes]
        return [m for m, _ in self._out]

    def before_send(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> None:
        """Hook for subclasses (Reptile sets beta here)."""

    # ---- replies ---------------------------------------------------------------
    def classify(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Sort replies into lost / declined / dropped; return the usable ones."""
        log_ = self.rounds.setdefault(server_round, RoundLog(server_round))
        theta = {k: a.numpy() for k, a in self.theta.items()} if self.theta else {}
        seen: set[str] = set()
        usable: list[Message] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            site = self.site_of_node.get(node, f"node-{node}")
            if msg.has_error():
                # lost nodes replied through the SuperLink: map back via reply_to
                site = self._site_for_reply(msg, site)
                log_.lost[site] = f"error {msg.error.code}: {msg.error.reason}"[:300]
                seen.add(site)
                continue
            seen.add(site)
            content = msg.content
            metrics = next(iter(content.metric_records.values()), None)
            if metrics is None or len(content.metric_records) != 1:
                log_.dropped[site] = "reply has no (or several) metric records"
                continue
            if int(metrics.get("declined", 0)):
                info = content.config_records.get("info")
                log_.declined[site] = str(info.get("reason", "declined")) if info else "declined"
                self._note_privacy(log_, site, metrics)
                continue
            if len(content.array_records) != 1:
                log_.dropped[site] = "reply must hold exactly one ArrayRecord"
                continue
            phi = next(iter(content.array_records.values()))
            try:
                reason = check_update(theta, {k: a.numpy() for k, a in phi.items()},
                                      self.max_update_norm)
            except Exception as exc:  # malformed arrays must never crash the server
                reason = f"unreadable arrays ({type(exc).__name__})"
            n = metrics.get("num-examples", 0)
            if reason is None and (not isinstance(n, int | float) or n <= 0):
                reason = "num-examples must be a positive number"
            if reason:
                log_.dropped[site] = reason
                log(WARNING, "round %s: dropped reply of %s: %s", server_round, site, reason)
                continue
            self._note_privacy(log_, site, metrics)
            log_.used.append(site)
            log_.examples += int(n)
            usable.append(msg)
        for site in log_.sampled:
            if site not in seen:
                log_.lost.setdefault(site, "no reply before the round timeout")
        log_.used.sort()
        # a fixed order makes the weighted sum (and so the run) bit-for-bit reproducible
        usable.sort(key=lambda m: self.site_of_node.get(m.metadata.src_node_id, ""))
        if usable:
            losses = [float(next(iter(m.content.metric_records.values()))["train-loss"])
                      for m in usable]
            log_.train_loss = sum(losses) / len(losses)
        log(INFO, "round %s: used %s, declined %s, dropped %s, lost %s", server_round,
            len(log_.used), len(log_.declined), len(log_.dropped), len(log_.lost))
        return usable

    def _site_for_reply(self, msg: Message, default: str) -> str:
        sent = {m.metadata.message_id: site for m, site in getattr(self, "_out", [])}
        return sent.get(msg.metadata.reply_to_message_id, default)

    @staticmethod
    def _note_privacy(log_: RoundLog, site: str, metrics) -> None:
        dp = bool(int(metrics.get("dp", 1)))
        log_.dp[site] = dp
        if dp:
            log_.epsilon[site] = float(metrics.get("epsilon-total", 0.0))
            log_.epsilon_round[site] = float(metrics.get("epsilon-round", 0.0))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        usable = self.classify(server_round, list(replies))
        if not usable:
            return None, None
        return super().aggregate_train(server_round, usable)
