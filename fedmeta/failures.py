"""Why a run stops: site errors as one line, and the rules that end a failing run.

A site that raises reaches the server as a Flower error reply whose reason is
``<class '...'>:<'...'>`` around the exception's text; with Flower's Ray
engine that text is a whole remote traceback with ANSI colour codes.
:func:`one_line_error` keeps only the site's own message.

:class:`RunWatch` sees every round's outcome and says when to stop:

* no usable reply for ``max_failed_rounds`` consecutive rounds;
* every site's privacy budget is spent (each site's latest answer is a budget decline);
* every site is lost or declined (each site's latest answer is an error or a decline).

A run stopped by any of these (or one that aggregated nothing at all) *failed*:
``fedmeta simulate`` exits non-zero and prints :func:`failure_text`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
MESSAGE_MARK = "occurred. Message:"
WRAPPED = re.compile(r"^<class '[^']*'>:<'(?P<text>.*)'>$", re.DOTALL)
TRACE_LINE = re.compile(r"^(Traceback \(most recent call last\)|File \"|\^+$|ray::|\(pid=)")
MAX_CHARS = 240
#: decline reasons that mean the site's privacy budget (or the run's cap) is used up
BUDGET_MARKS = ("privacy budget:", "the run's epsilon")


def one_line_error(reason: str) -> str:
    """The site's own one-line message inside a Flower error reason (no traceback, no
    colour codes, at most ``MAX_CHARS`` characters)."""
    text = ANSI.sub("", str(reason)).replace("\r", "")
    if MESSAGE_MARK in text:
        text = text.rsplit(MESSAGE_MARK, 1)[1]
    else:
        wrapped = WRAPPED.match(text.strip())
        if wrapped:
            text = wrapped.group("text")
    text = text.strip().removesuffix("'>")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not TRACE_LINE.match(ln)] or lines
    line = lines[0] if lines else "unknown error"
    return line if len(line) <= MAX_CHARS else line[: MAX_CHARS - 3] + "..."


def is_budget_reason(reason: str) -> bool:
    return any(mark in reason for mark in BUDGET_MARKS)


@dataclass
class RunWatch:
    """Outcome of each site's latest round and the count of rounds without a usable reply."""

    sites: list[str]
    max_failed_rounds: int = 3
    streak: int = 0
    aggregated: int = 0
    latest: dict[str, tuple[str, str]] = field(default_factory=dict)
    """site -> (outcome, reason): outcome is used | declined | dropped | lost."""

    def observe(
        self,
        used: list[str],
        declined: dict[str, str],
        dropped: dict[str, str],
        lost: dict[str, str],
        aggregated: bool,
    ) -> str | None:
        """Record one round; return why the run must stop, or None."""
        for site in used:
            self.latest[site] = ("used", "")
        for outcome, reasons in (("declined", declined), ("dropped", dropped), ("lost", lost)):
            for site, reason in reasons.items():
                self.latest[site] = (outcome, reason)
        self.aggregated += int(aggregated)
        self.streak = 0 if aggregated else self.streak + 1
        return self.stop_reason()

    def stop_reason(self) -> str | None:
        known = [s for s in self.sites if s in self.latest]
        if self.sites and len(known) == len(self.sites):
            latest = [self.latest[s] for s in self.sites]
            if all(o == "declined" and is_budget_reason(r) for o, r in latest):
                return "every site's privacy budget is spent"
            if all(o in ("lost", "declined") for o, _ in latest):
                return "every site is lost or declined"
        if self.streak >= self.max_failed_rounds:
            return (
                f"no usable reply for {self.streak} consecutive round(s) "
                f"(max-failed-rounds = {self.max_failed_rounds})"
            )
        return None

    def problems(self) -> dict[str, str]:
        """site -> its latest one-line problem (sites whose latest round was used: none)."""
        return {s: f"{o}: {r}" for s, (o, r) in sorted(self.latest.items()) if o != "used"}

    def state(self) -> dict[str, Any]:
        return {
            "streak": self.streak,
            "aggregated": self.aggregated,
            "latest": {s: list(v) for s, v in self.latest.items()},
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.streak = int(state.get("streak", 0))
        self.aggregated = int(state.get("aggregated", 0))
        self.latest = {
            str(s): (str(v[0]), str(v[1])) for s, v in dict(state.get("latest", {})).items()
        }


def failure_text(summary: dict[str, Any], max_sites: int = 12) -> str:
    """A one-screen account of why a run failed (from its summary)."""
    failure = summary.get("failure") or {}
    lines = [f"run {summary.get('run', '?')} FAILED: {failure.get('reason', 'unknown')}"]
    done = summary.get("aggregated_rounds", 0)
    last = summary.get("last_round", 0)
    lines.append(f"rounds run: {last} of {summary.get('rounds', '?')}; rounds aggregated: {done}")
    sites = dict(failure.get("sites") or {})
    for site, problem in list(sites.items())[:max_sites]:
        lines.append(f"  {site}: {problem}")
    if len(sites) > max_sites:
        lines.append(f"  ... and {len(sites) - max_sites} more site(s) (see metrics.jsonl)")
    if summary.get("trained"):
        lines.append(f"the model of the last aggregated round is in {summary.get('model_file')}")
    else:
        lines.append("no model was written: no round was aggregated (nothing was trained)")
    return "\n".join(lines)
