"""The report's plots as PNG bytes (matplotlib's Agg canvas; no pyplot global state)."""

from __future__ import annotations

import base64
import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedmeta.report.model import EvalPoint, Report


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def epsilon_plot(report: Report) -> bytes | None:
    """One bar per site: epsilon spent before this run, spent in this run, budget left."""
    sites = [p for p in report.privacy if p.dp and p.epsilon_total is not None]
    if not sites:
        return None
    sites = sites[::-1]  # the first site on top
    fig = Figure(figsize=(7.5, 0.9 + 0.28 * len(sites)))
    ax = fig.add_subplot()
    ys = list(range(len(sites)))
    before = [p.epsilon_before or 0.0 for p in sites]
    now = [p.epsilon_run or 0.0 for p in sites]
    left = [
        p.budget_left if p.budget_left is not None and p.epsilon_max != float("inf") else 0.0
        for p in sites
    ]
    ax.barh(ys, before, color="0.6", label="spent before this run", height=0.65)
    ax.barh(ys, now, left=before, color="C0", label="spent in this run", height=0.65)
    ax.barh(
        ys,
        left,
        left=[b + n for b, n in zip(before, now, strict=True)],
        color="C2",
        alpha=0.3,
        label="budget left",
        height=0.65,
    )
    for y, p in zip(ys, sites, strict=True):
        ax.annotate(
            f"{p.epsilon_run or 0.0:.2g} this run; left {p.budget_left or 0.0:.2g}"
            f" of {p.epsilon_max:g}",
            (0, y),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=7,
            color="white" if (p.epsilon_run or 0) > 1 else "0.1",
        )
    if report.epsilon_warn is not None:
        ax.axvline(report.epsilon_warn, color="C3", linestyle=":", linewidth=1)
    ax.set_yticks(ys, [p.site_id for p in sites], fontsize=8)
    ax.set_xlabel("epsilon (sample level)", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title(
        "Privacy budget per site: spent before, spent in this run, left"
        + (
            f" (dotted: warning level {report.epsilon_warn:g})"
            if report.epsilon_warn is not None
            else ""
        ),
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="lower right", ncols=3, bbox_to_anchor=(1.0, 1.08), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _series(ax, points: list[EvalPoint], label: str, style: str) -> None:
    rounds = [p.round for p in points if p.adapted is not None]
    adapted = [p.adapted for p in points if p.adapted is not None]
    ci = [p.adapted_ci95 or 0.0 for p in points if p.adapted is not None]
    un_r = [p.round for p in points if p.unadapted is not None]
    un = [p.unadapted for p in points if p.unadapted is not None]
    if rounds:
        ax.plot(
            rounds,
            adapted,
            style,
            marker="o",
            color="C0" if style == "-" else "C2",
            label=f"{label}: adapted",
        )
        if style == "-":
            ax.fill_between(
                rounds,
                [a - c for a, c in zip(adapted, ci, strict=True)],
                [a + c for a, c in zip(adapted, ci, strict=True)],
                color="C0",
                alpha=0.15,
                label=f"{label}: adapted, 95% CI",
            )
    if un_r:
        ax.plot(
            un_r,
            un,
            style,
            marker="s",
            color="C1" if style == "-" else "C3",
            label=f"{label}: un-adapted",
        )


def learning_plot(report: Report) -> bytes | None:
    """Adapted vs un-adapted accuracy per round (and the baseline run's, dashed)."""
    lr = report.learning
    if not lr.points and not lr.baseline_points:
        return None
    fig = Figure(figsize=(7.5, 3.8))
    ax = fig.add_subplot()
    _series(ax, lr.points, f"this run ({lr.strategy})", "-")
    if lr.baseline_points:
        _series(ax, lr.baseline_points, f"baseline ({lr.baseline_strategy})", "--")
    shots = next((p for p in lr.points if p.shots), None)
    what = f"{shots.n_way}-way {shots.shots}-shot " if shots else ""
    ax.set_title(f"{what}{lr.metric or 'metric'} on held-out data ({lr.task})", fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(lr.metric or "metric")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def shots_plot(report: Report) -> bytes | None:
    """``fedmeta evaluate``'s curve: each method's accuracy against shots, with 95% CIs."""
    pts = report.learning.shots_curve
    if not pts:
        return None
    fig = Figure(figsize=(7.5, 3.8))
    ax = fig.add_subplot()
    for method in dict.fromkeys(p.method for p in pts):
        mine = sorted((p for p in pts if p.method == method), key=lambda p: p.shots)
        ax.errorbar(
            [p.shots for p in mine],
            [p.mean for p in mine],
            yerr=[p.ci95 for p in mine],
            marker="o",
            capsize=3,
            linestyle="--" if "+proto" in method else "-",
            label=mine[0].label,
        )
    ax.set_xlabel("labelled examples per class at the new site")
    ax.set_ylabel(report.learning.metric or "metric")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def plots(report: Report) -> dict[str, bytes]:
    """Name -> PNG bytes of every plot the report has data for."""
    out = {}
    for name, fn in (("epsilon", epsilon_plot), ("learning", learning_plot), ("shots", shots_plot)):
        png = fn(report)
        if png is not None:
            out[name] = png
    return out
