"""What happened in one round (``RoundLog``, as written to metrics.jsonl) and its digests."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from flwr.app import ArrayRecord

from fedmeta.meta.updates import model_digest


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


DETAILS_BUDGET = 3600  # bytes of a round.end entry's details (the log allows 4096)


def outcome_details(log_: RoundLog) -> dict[str, str | int]:
    """Each lost, dropped and declined site of a round with its reason, for the signed
    ``round.end`` entry: lost sites first; what does not fit is counted in ``more``."""
    out: dict[str, str | int] = {}
    left = 0
    size = 0
    for kind, items in (
        ("lost", log_.lost),
        ("dropped", log_.dropped),
        ("declined", log_.declined),
    ):
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
