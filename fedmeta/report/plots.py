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
    """Cumulative epsilon of each site over this run's rounds, against its budget."""
    sites = [p for p in report.privacy if p.dp and p.points]
    if not sites:
        return None
    fig = Figure(figsize=(7.5, 3.8))
    ax = fig.add_subplot()
    markers = "osD^vP*Xh<>"
    budgets: dict[float, list[str]] = {}
    for i, p in enumerate(sites):
        mine = [pt for pt in p.points if pt.this_run]
        before = [pt.epsilon_after for pt in p.points if not pt.this_run]
        xs = [0] + [pt.round for pt in mine]
        ys = [before[-1] if before else 0.0] + [pt.epsilon_after for pt in mine]
        ax.plot(xs, ys, marker=markers[i % len(markers)], color=f"C{i % 10}", label=p.site_id,
                markersize=8 - 4 * i / max(1, len(sites) - 1), alpha=0.85)
        if p.epsilon_max is not None and p.epsilon_max != float("inf"):
            budgets.setdefault(p.epsilon_max, []).append(p.site_id)
    for j, (budget, ids) in enumerate(sorted(budgets.items())):
        ax.axhline(budget, color="C3", linestyle="--", linewidth=1.2, alpha=0.8 - 0.1 * j)
        ax.annotate(f"budget {budget:g} ({', '.join(ids) if len(budgets) > 1 else 'all sites'})",
                    (0, budget), textcoords="offset points", xytext=(4, 4), fontsize=8,
                    color="C3")
    if report.run.dp and report.run.declared_epsilon is not None:
        ax.axhline(report.run.declared_epsilon, color="0.4", linestyle=":", linewidth=1.2)
        ax.annotate(f"declared for the run: {report.run.declared_epsilon:g}",
                    (0, report.run.declared_epsilon), textcoords="offset points", xytext=(4, -12),
                    fontsize=8, color="0.3")
    declared = set(budgets)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative epsilon (all runs)")
    ax.set_title("Cumulative epsilon per site (its ledger) against its budget"
                 + (f" (epsilon_max {', '.join(f'{e:g}' for e in sorted(declared))})"
                    if declared else ""), fontsize=10)
    top = max([*budgets, *(pt.epsilon_after for p in sites for pt in p.points),
               report.run.declared_epsilon or 0.0])
    ax.set_ylim(0, top * 1.12 if top > 0 else 1.0)
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
        ax.errorbar([p.shots for p in mine], [p.mean for p in mine],
                    yerr=[p.ci95 for p in mine], marker="o", capsize=3,
                    linestyle="--" if "+proto" in method else "-", label=mine[0].label)
    ax.set_xlabel("labelled examples per class at the new site")
    ax.set_ylabel(report.learning.metric or "metric")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def plots(report: Report) -> dict[str, bytes]:
    """Name -> PNG bytes of every plot the report has data for."""
    out = {}
    for name, fn in (("epsilon", epsilon_plot), ("learning", learning_plot),
                     ("shots", shots_plot)):
        png = fn(report)
        if png is not None:
            out[name] = png
    return out
