"""Every reply is classified before aggregation: lost (error reply or no reply),
declined (budget, policy), dropped (fails validation), or used. Only used replies
reach Flower's aggregation, so a round where every site declines aggregates nothing
instead of dividing by zero."""

from __future__ import annotations

import json
from collections.abc import Iterable
from logging import INFO, WARNING, getLogger

from flwr.app import ArrayRecord, Message

from fedmeta.failures import one_line_error
from fedmeta.meta.updates import check_update
from server.strategy.roundlog import RoundLog

log = getLogger(__name__).log


class ReplyClassifier:
    """Sorts a round's replies into its ``RoundLog``; returns the usable ones."""

    def __init__(self, site_of_node: dict[int, str], max_update_norm: float) -> None:
        self.site_of_node, self.max_update_norm = site_of_node, max_update_norm

    def classify(
        self,
        server_round: int,
        log_: RoundLog,
        replies: Iterable[Message],
        theta_arrays: ArrayRecord | None,
        sent: dict[str, str],
    ) -> list[Message]:
        """``sent``: message id -> site of the round's messages (lost nodes reply
        through the SuperLink: they are mapped back by ``reply_to``)."""
        theta = {k: a.numpy() for k, a in theta_arrays.items()} if theta_arrays else {}
        seen: set[str] = set()
        usable: list[Message] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            site = self.site_of_node.get(node, f"node-{node}")
            if msg.has_error():
                site = sent.get(msg.metadata.reply_to_message_id, site)
                log_.lost[site] = f"error {msg.error.code}: {one_line_error(msg.error.reason)}"
                seen.add(site)
                continue
            seen.add(site)
            if self._usable(server_round, log_, site, msg, theta):
                usable.append(msg)
        for site in log_.sampled:
            if site not in seen:
                log_.lost.setdefault(site, "no reply before the round timeout")
        log_.used.sort()
        # a fixed order makes the weighted sum (and so the run) bit-for-bit reproducible
        usable.sort(key=lambda m: self.site_of_node.get(m.metadata.src_node_id, ""))
        log(
            INFO,
            "round %s: used %s, declined %s, dropped %s, lost %s",
            server_round,
            len(log_.used),
            len(log_.declined),
            len(log_.dropped),
            len(log_.lost),
        )
        return usable

    def _usable(
        self, server_round: int, log_: RoundLog, site: str, msg: Message, theta: dict
    ) -> bool:
        """Note one site's (non-error) reply as declined, dropped or used."""
        content = msg.content
        metrics = next(iter(content.metric_records.values()), None)
        if metrics is None or len(content.metric_records) != 1:
            log_.dropped[site] = "reply has no (or several) metric records"
            return False
        info = content.config_records.get("info")
        if info is not None:
            note_evidence(log_, site, info)
        if int(metrics.get("declined", 0)):
            log_.declined[site] = str(info.get("reason", "declined")) if info else "declined"
            note_privacy(log_, site, metrics)
            return False
        if len(content.array_records) != 1:
            log_.dropped[site] = "reply must hold exactly one ArrayRecord"
            return False
        phi = next(iter(content.array_records.values()))
        try:
            reason = check_update(
                theta, {k: a.numpy() for k, a in phi.items()}, self.max_update_norm
            )
        except Exception as exc:  # malformed arrays must never crash the server
            reason = f"unreadable arrays ({type(exc).__name__})"
        n = metrics.get("num-examples", 0)
        if reason is None and (not isinstance(n, int | float) or n <= 0):
            reason = "num-examples must be a positive number"
        if reason:
            log_.dropped[site] = reason
            log(WARNING, "round %s: dropped reply of %s: %s", server_round, site, reason)
            return False
        note_privacy(log_, site, metrics)
        log_.used.append(site)
        log_.examples += int(n)
        return True


def note_evidence(log_: RoundLog, site: str, info) -> None:
    """Exclusion counts by rule and the site's audit head (receipt), if sent."""
    try:
        counts = json.loads(str(info.get("exclusions", "{}")))
        if isinstance(counts, dict) and counts:
            # a site sends counts below its minimum cohort size as "<k"
            log_.exclusions[site] = {
                str(k): v if isinstance(v, str) else int(v) for k, v in counts.items()
            }
    except (ValueError, TypeError):
        log(WARNING, "site %s sent unreadable exclusion counts", site)
    receipt = str(info.get("receipt", ""))
    if receipt:
        log_.receipts[site] = receipt[:100]


def note_privacy(log_: RoundLog, site: str, metrics) -> None:
    dp = bool(int(metrics.get("dp", 1)))
    log_.dp[site] = dp
    if dp:
        log_.epsilon[site] = float(metrics.get("epsilon-total", 0.0))
        log_.epsilon_round[site] = float(metrics.get("epsilon-round", 0.0))
