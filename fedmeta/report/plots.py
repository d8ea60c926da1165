"""The report's plots as PNG bytes (matplotlib's Agg canvas; no pyplot global state)."""

from __future__ import annotations

import base64
import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedmeta.report.model import EvalPoint, Report


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def epsilon_plot(report: Report) -> bytes | None:
    """Cumulative epsilon of each site over this run's rounds, against its budget."""
    sites = [p for p in report.privacy if p.dp and p.points]
    if not sites:
        return None
    fig = Figure(figsize=(7.5, 3.8))
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(sites))]
    for p, color in zip(sites, colors, strict=True):
        mine = [pt for pt in p.points if pt.this_run]
        before = [pt.epsilon_after for pt in p.points if not pt.this_run]
        xs = [0] + [pt.round for pt in mine]
        ys = [before[-1] if before else 0.0] + [pt.epsilon_after for pt in mine]
        ax.plot(xs, ys, marker="o", color=color, label=p.site_id)
        if p.epsilon_max is not None and p.epsilon_max != float("inf"):
            ax.axhline(p.epsilon_max, color=color, linestyle="--", linewidth=1, alpha=0.7)
    declared = {p.epsilon_max for p in sites if p.epsilon_max is not None}
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative epsilon (all runs)")
    ax.set_title("Privacy spent per site; dashed: the site's budget "
                 + (f"(epsilon_max {', '.join(f'{e:g}' for e in sorted(declared))})"
                    if declared else ""), fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    return _png(fig)


def _series(ax, points: list[EvalPoint], label: str, style: str) -> None:
    rounds = [p.round for p in points if p.adapted is not None]
    adapted = [p.adapted for p in points if p.adapted is not None]
    ci = [p.adapted_ci95 or 0.0 for p in points if p.adapted is not None]
    un_r = [p.round for p in points if p.unadapted is not None]
    un = [p.unadapted for p in points if p.unadapted is not None]
    if rounds:
        ax.plot(rounds, adapted, style, marker="o", color="C0" if style == "-" else "C2",
                label=f"{label}: adapted")
        if style == "-":
            ax.fill_between(rounds, [a - c for a, c in zip(adapted, ci, strict=True)],
                            [a + c for a, c in zip(adapted, ci, strict=True)], color="C0",
                            alpha=0.15, label=f"{label}: adapted, 95% CI")
    if un_r:
        ax.plot(un_r, un, style, marker="s", color="C1" if style == "-" else "C3",
                label=f"{label}: un-adapted")


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
    ax.set_xlabel("round")
    ax.set_ylabel(lr.metric or "metric")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def plots(report: Report) -> dict[str, bytes]:
    """Name -> PNG bytes of every plot the report has data for."""
    out = {}
    for name, fn in (("epsilon", epsilon_plot), ("learning", learning_plot)):
        png = fn(report)
        if png is not None:
            out[name] = png
    return out
