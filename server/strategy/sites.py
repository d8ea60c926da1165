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

import json
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING, getLogger

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedmeta.audit import AuditLog
from fedmeta.config import sites_per_round
from fedmeta.deploy.serverkey import ROUND_START_KEY, entry_line
from fedmeta.failures import one_line_error
from fedmeta.meta.updates import check_update, model_digest

log = getLogger(__name__).log


def digest(arrays: ArrayRecord) -> str:
    return model_digest({k: a.numpy() for k, a in arrays.items()})


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
    epsilon: dict[str, float] = field(default_factory=dict)
    epsilon_round: dict[str, float] = field(default_factory=dict)
    dp: dict[str, bool] = field(default_factory=dict)
    beta: float | None = None
    stopped: str | None = None
    exclusions: dict[str, dict[str, int | str]] = field(default_factory=dict)
    receipts: dict[str, str] = field(default_factory=dict)


class RunStopped(RuntimeError):
    """The run cannot continue (e.g. fewer sites than the declared minimum)."""


DETAILS_BUDGET = 3600  # bytes of a round.end entry's details (the log allows 4096)


def outcome_details(log_: RoundLog) -> dict[str, str | int]:
    """Each lost, dropped and declined site of a round with its reason, for the signed
    ``round.end`` entry: lost sites first; what does not fit is counted in ``more``."""
    out: dict[str, str | int] = {}
    left = 0
    size = 0
    for kind, items in (("lost", log_.lost), ("dropped", log_.dropped),
                        ("declined", log_.declined)):
        for site, reason in sorted(items.items()):
            key, value = f"{kind}:{site}"[:64], " ".join(str(reason).split())[:200]
            cost = len(json.dumps({key: value}))
            if len(out) >= 30 or size + cost > DETAILS_BUDGET:
                left += 1
                continue
            out[key], size = value, size + cost
    if left:
        out["more"] = left
    return out


class SiteAwareMixin:
    """Mixed in front of a Flower strategy (``class X(SiteAwareMixin, FedAvg)``)."""

    def setup_sites(self, *, sites: dict[int, str], seed: int, min_sites: int,
                    node_wait_s: float, max_update_norm: float,
                    audit: AuditLog | None = None, run_id: str = "-") -> None:
        self.audit = audit
        self.run_id = run_id
        self.server_head = ""
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
        wanted = sites_per_round(n_known, self.fraction_train, self.min_sites)
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
            if self.audit:
                self.audit.append("run.stop", run_id=self.run_id, round=server_round,
                                  decision="deny", rule_ids=["PRIV-MIN-SITES"],
                                  details={"reason": self.stopped[:500]})
            return []
        log_.sampled = [self.site_of_node[n] for n in nodes]
        self.before_send(server_round, arrays, config)
        if self.audit:  # durable before the messages leave; sent, signed, to the sites
            started = self.audit.append("round.start", run_id=self.run_id, round=server_round,
                                        decision="allow", model_out=digest(arrays),
                                        counts={"sampled": len(nodes)},
                                        details={"sites": ",".join(log_.sampled)[:500],
                                                 "beta": log_.beta})
            config[ROUND_START_KEY] = entry_line(started)
        config["server-round"] = server_round
        config["server-head"] = self.server_head
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
                log_.lost[site] = f"error {msg.error.code}: {one_line_error(msg.error.reason)}"
                seen.add(site)
                continue
            seen.add(site)
            content = msg.content
            metrics = next(iter(content.metric_records.values()), None)
            if metrics is None or len(content.metric_records) != 1:
                log_.dropped[site] = "reply has no (or several) metric records"
                continue
            info = content.config_records.get("info")
            if info is not None:
                self._note_evidence(log_, site, info)
            if int(metrics.get("declined", 0)):
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
        log(INFO, "round %s: used %s, declined %s, dropped %s, lost %s", server_round,
            len(log_.used), len(log_.declined), len(log_.dropped), len(log_.lost))
        return usable

    def _site_for_reply(self, msg: Message, default: str) -> str:
        sent = {m.metadata.message_id: site for m, site in getattr(self, "_out", [])}
        return sent.get(msg.metadata.reply_to_message_id, default)

    @staticmethod
    def _note_evidence(log_: RoundLog, site: str, info) -> None:
        """Exclusion counts by rule and the site's audit head (receipt), if sent."""
        try:
            counts = json.loads(str(info.get("exclusions", "{}")))
            if isinstance(counts, dict) and counts:
                # a site sends counts below its minimum cohort size as "<k"
                log_.exclusions[site] = {str(k): v if isinstance(v, str) else int(v)
                                         for k, v in counts.items()}
        except (ValueError, TypeError):
            log(WARNING, "site %s sent unreadable exclusion counts", site)
        receipt = str(info.get("receipt", ""))
        if receipt:
            log_.receipts[site] = receipt[:100]

    @staticmethod
    def _note_privacy(log_: RoundLog, site: str, metrics) -> None:
        dp = bool(int(metrics.get("dp", 1)))
        log_.dp[site] = dp
        if dp:
            log_.epsilon[site] = float(metrics.get("epsilon-total", 0.0))
            log_.epsilon_round[site] = float(metrics.get("epsilon-round", 0.0))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        usable = self.classify(server_round, list(replies))
        log_ = self.rounds[server_round]
        arrays, metrics = None, None
        if len(usable) < self.min_sites and usable:
            log_.stopped = (f"round {server_round}: {len(usable)} usable replies, fewer than "
                            f"the minimum of {self.min_sites}; not aggregated")
            log(WARNING, log_.stopped)
        elif usable:
            arrays, metrics = super().aggregate_train(server_round, usable)
        if self.audit:
            for site, receipt in sorted(log_.receipts.items()):
                self.audit.append("round.receipt", run_id=self.run_id, round=server_round,
                                  details={"site": site, "receipt": receipt})
            self.audit.append(
                "round.end", run_id=self.run_id, round=server_round,
                decision="allow" if arrays is not None else "deny",
                model_in=digest(self.theta) if self.theta else None,
                model_out=digest(arrays) if arrays is not None else None,
                counts={"used": len(log_.used), "declined": len(log_.declined),
                        "dropped": len(log_.dropped), "lost": len(log_.lost),
                        "examples": log_.examples},
                details=outcome_details(log_))
            self.server_head = str(self.audit.checkpoint(self.run_id, server_round))
        return arrays, metrics
