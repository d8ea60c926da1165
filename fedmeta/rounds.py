"""Per-round results and the per-round callback mechanism.

The server writes one line per round to ``metrics.jsonl`` and, in the same
step, hands the line to every round callback: the ``on_round`` argument of
:func:`fedmeta.simulate`, the TensorBoard and MLflow trackers
(``fedmeta.tracking``), or anything registered with :func:`listening`.
Callbacks receive :class:`RoundMetrics`; a callback that raises stops the run
(after the round's checkpoint, so ``fedmeta simulate --resume`` continues it).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


def _num(value: Any) -> float | None:
    """A finite float, or None (NaN, infinities and missing values read as None)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class EvalMetrics:
    """Server-side meta-evaluation of theta on held-out classes/tasks (None = not finite)."""

    metric: str
    adapted: float | None
    adapted_ci95: float | None
    unadapted: float | None
    episodes: int
    shots: int
    n_way: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalMetrics:
        return cls(
            str(d.get("metric", "")),
            _num(d.get("adapted")),
            _num(d.get("adapted_ci95")),
            _num(d.get("unadapted")),
            int(d.get("episodes") or 0),
            int(d.get("shots") or 0),
            int(d.get("n_way") or 0),
        )


@dataclass(frozen=True)
class RoundMetrics:
    """One line of ``metrics.jsonl`` (round 0 is the initial model, before training)."""

    round: int
    run: str
    model_sha256: str | None
    sampled: list[str] = field(default_factory=list)
    used: list[str] = field(default_factory=list)
    declined: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    lost: dict[str, str] = field(default_factory=dict)
    examples: int = 0
    epsilon: dict[str, float] = field(default_factory=dict)
    """Each DP site's total epsilon after this round (its ledger, all runs)."""
    epsilon_round: dict[str, float] = field(default_factory=dict)
    beta: float | None = None
    eval: EvalMetrics | None = None
    elapsed_s: float = 0.0
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """The line as written (every field, including those not typed above)."""

    @property
    def aggregated(self) -> bool:
        """Whether this round changed theta (some site's update was used)."""
        return bool(self.used) and self.round > 0

    @classmethod
    def from_line(cls, line: dict[str, Any]) -> RoundMetrics:
        def floats(d: Any) -> dict[str, float]:
            pairs = ((str(k), _num(v)) for k, v in dict(d or {}).items())
            return {k: v for k, v in pairs if v is not None}

        ev = line.get("eval")
        return cls(
            round=int(line.get("round", 0)),
            run=str(line.get("run", "")),
            model_sha256=line.get("model_sha256"),
            sampled=list(line.get("sampled") or []),
            used=list(line.get("used") or []),
            declined=dict(line.get("declined") or {}),
            dropped=dict(line.get("dropped") or {}),
            lost=dict(line.get("lost") or {}),
            examples=int(line.get("examples") or 0),
            epsilon=floats(line.get("epsilon")),
            epsilon_round=floats(line.get("epsilon_round")),
            beta=_num(line.get("beta")),
            eval=EvalMetrics.from_dict(ev) if isinstance(ev, dict) else None,
            elapsed_s=_num(line.get("elapsed_s")) or 0.0,
            raw=dict(line),
        )

    def scalars(self) -> dict[str, float]:
        """Finite numbers worth plotting, by name (for TensorBoard, MLflow)."""
        out: dict[str, float] = {
            "sites/used": float(len(self.used)),
            "sites/declined": float(len(self.declined)),
            "sites/lost": float(len(self.lost)),
            "sites/dropped": float(len(self.dropped)),
            "examples": float(self.examples),
        }
        if self.beta is not None:
            out["beta"] = self.beta
        if self.eval is not None:
            for name in ("adapted", "adapted_ci95", "unadapted"):
                value = getattr(self.eval, name)
                if value is not None:
                    out[f"eval/{self.eval.metric}_{name}"] = value
        for site, eps in self.epsilon.items():
            out[f"epsilon/{site}"] = eps
        return out


RoundCallback = Callable[[RoundMetrics], None]
_listeners: list[RoundCallback] = []
_lock = threading.Lock()


@contextlib.contextmanager
def listening(*callbacks: RoundCallback | None) -> Iterator[None]:
    """Register round callbacks for the runs started inside this block (this process;
    Flower's simulation runs the ServerApp in this process with either backend)."""
    added = [cb for cb in callbacks if cb is not None]
    with _lock:
        _listeners.extend(added)
    try:
        yield
    finally:
        with _lock:
            for cb in added:
                _listeners.remove(cb)


def emit(line: dict[str, Any]) -> None:
    """Hand one metrics line to every registered callback (exceptions propagate)."""
    with _lock:
        callbacks = list(_listeners)
    if not callbacks:
        return
    metrics = RoundMetrics.from_line(line)
    for cb in callbacks:
        cb(metrics)
