"""The curve the product exists to bend: accuracy at a new site against labelled examples.

For each number of shots K, every method (``fedmeta.meta.methods``: scratch,
FedAvg-transfer, Reptile, FOMAML, and prototype classifiers on the federated
models' embeddings) is measured with the same step budget on the same N-way
K-shot test episodes of held-out classes.

The protocol, per shot count and per method: every adaptation learning rate
of one grid is scored on ``val_episodes`` (>= 100 by default) episodes of the
validation classes, the same validation episodes for every method; the rate
kept is the smallest whose validation score is within one standard error of
the best rate's (the one-standard-error rule, ``one_se_choice``); it is then
measured once on the test episodes. A prototype classifier takes no step and so
has no rate to choose. With ``shift`` the new sites also differ in acquisition
(``fedmeta.data.tasks.shifted``), for validation and test alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmeta.config import RunConfig, build_task
from fedmeta.data.tasks.base import Task
from fedmeta.meta.adaptation import Schedule, mean_ci95
from fedmeta.meta.methods import (
    BASE_OF_STRATEGY,
    Method,
    draw_episodes,
    episode_scores,
    episode_scores_grid,
    methods_for,
)
from fedmeta.meta.protocol import LR_GRID
from fedmeta.metrics import load_model
from fedmeta.paths import CONFIG_FILE

METHOD_OF_STRATEGY = BASE_OF_STRATEGY
LABELS = {
    "scratch": "from scratch (traditional ML)",
    "transfer": "FedAvg + fine-tuning (transfer)",
    "meta": "Reptile (meta-learning)",
    "fomaml": "FOMAML (meta-learning)",
}
MIN_VAL_EPISODES = 100
LR_RULE = "one-se"  # the smallest rate within one standard error of the best (validation)
#: the step size over the adaptation steps (``adaptation.step_size``): cosine-decayed to 0
SCHEDULE: Schedule = "cosine"


class CurveError(ValueError):
    """Run directories that cannot be compared (one line)."""


@dataclass(frozen=True)
class Point:
    method: str
    shots: int
    metric: str
    mean: float
    ci95: float
    lr: float | None
    episodes: int
    run_dir: str | None
    label: str = ""
    steps: int = 0
    val_mean: float | None = None
    val_episodes: int = 0
    #: every rate tried: "lr" -> [validation mean, standard error] (empty without steps)
    val_grid: dict[str, list[float]] = field(default_factory=dict)


def load_initialisations(
    run_dirs: Sequence[Path], bases: Sequence[str] | None = None
) -> tuple[RunConfig, dict[str, Any]]:
    """(config of the first run, base method -> (state, out_dim, run_dir)) incl. scratch;
    with ``bases``, only those runs' models are read."""
    inits: dict[str, Any] = {"scratch": (None, 0, None)}
    first: RunConfig | None = None
    for run_dir in run_dirs:
        cfg = RunConfig.load(Path(run_dir) / CONFIG_FILE)
        if first and (cfg.task, cfg.n_way) != (first.task, first.n_way):
            raise CurveError(
                f"{run_dir}: task {cfg.task} ({cfg.n_way}-way) differs from "
                f"{first.task} ({first.n_way}-way); compare runs of one task"
            )
        first = first or cfg
        method = METHOD_OF_STRATEGY[cfg.strategy]
        if method in inits:
            raise CurveError(f"{run_dir}: a second {cfg.strategy} run; give one per strategy")
        if bases is not None and method not in bases:
            continue
        saved = load_model(Path(run_dir))
        inits[method] = (saved["state_dict"], int(saved["out_dim"]), str(run_dir))
    if first is None:
        raise CurveError("no run directory given")
    return first, inits


def evaluation_task(cfg: RunConfig, shift: bool) -> Task:
    task = build_task(cfg)
    if not shift:
        return task
    from fedmeta.data.tasks.digits import DigitsFewShot
    from fedmeta.data.tasks.shifted import ShiftedDigits

    if not isinstance(task, DigitsFewShot):
        raise CurveError(
            f"--shift: acquisition shifts are defined for digits-fewshot runs, not {cfg.task}"
        )
    return ShiftedDigits(
        n_way=task.n_way, pool_per_class=task.pool_per_class, num_sites=task.num_sites
    )


def grid_summary(grid: Mapping[float, Sequence[float]]) -> dict[float, tuple[float, float]]:
    """rate -> (mean validation score, its standard error over the episodes)."""
    out = {}
    for lr, scores in grid.items():
        arr = np.asarray(scores, dtype=np.float64)
        se = float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else 0.0
        out[lr] = (float(arr.mean()), se)
    return out


def one_se_choice(
    summary: Mapping[float, tuple[float, float]], higher_is_better: bool = True
) -> float:
    """The smallest rate whose mean is within one standard error of the best rate's.

    The one-standard-error rule of model selection (Breiman et al. 1984; Hastie,
    Tibshirani and Friedman, *Elements of Statistical Learning*, 7.10): rates the
    validation episodes cannot tell apart from the best are settled in favour of
    the most conservative one, the smallest step, which moves least from the
    initialisation and is the least likely to overshoot on classes it was not
    chosen on. A rate better by more than one standard error is kept.
    """
    if not summary:
        raise ValueError("no learning rate to choose from")
    sign = 1.0 if higher_is_better else -1.0
    best = max(summary, key=lambda lr: (sign * summary[lr][0], -lr))
    mean, se = summary[best]
    return min(lr for lr, (m, _) in summary.items() if sign * (mean - m) <= se)


def choose_lr(
    task: Task,
    method: Method,
    init,
    val_eps,
    lr_grid: Sequence[float],
    steps: int,
    seed: int,
    schedule: Schedule = "constant",
    known: Mapping[float, Sequence[float]] | None = None,
) -> tuple[float | None, float, dict[float, tuple[float, float]]]:
    """(chosen rate, its validation score, every rate's (validation mean, standard error));
    (None, score, {}) for a method without steps.

    ``known``: rate -> (validation mean, standard error) already scored on these same
    validation episodes with these settings; only the other rates are scored (each
    rate's adaptation is independent of the others', so the summary is the same).
    """
    fine_tune = method.fine_tune and steps > 0
    have = {lr: tuple(known[lr]) for lr in lr_grid if fine_tune and known and lr in known}
    todo = [lr for lr in lr_grid if lr not in have]
    grid = (
        episode_scores_grid(
            task, method, init, val_eps, steps=steps, lrs=todo, seed=seed, schedule=schedule
        )
        if todo
        else {}
    )
    scored = grid_summary(grid)
    if not fine_tune:
        return None, next(iter(scored.values()))[0], {}
    summary = {lr: have[lr] if lr in have else scored[lr] for lr in lr_grid}
    lr = one_se_choice(summary, task.kind == "classification")
    return lr, summary[lr][0], summary


def shots_curve(
    run_dirs: Sequence[Path],
    shots: Sequence[int],
    *,
    episodes: int = 400,
    val_episodes: int = MIN_VAL_EPISODES,
    steps: int | None = None,
    lr_grid: Sequence[float] = LR_GRID,
    query: int = 15,
    seed: int = 0,
    prototypes: bool = True,
    shift: bool = False,
    methods: Sequence[str] | None = None,
    measured: Mapping[tuple[str, int, float | None], tuple[float, float]] | None = None,
    schedule: Schedule = SCHEDULE,
    val_measured: Mapping[tuple[str, int], Mapping[float, Sequence[float]]] | None = None,
) -> dict[str, Any]:
    """Every method's score per shot count (``methods``: only those, by name).

    ``val_measured``: validation (mean, standard error) per rate already taken with these
    same settings, by (method, shots); only the grid's other rates are scored.

    ``measured``: test scores (mean, ci95) already taken with these same settings,
    by (method, shots, rate); a choice that lands on one is not measured again
    (the episodes and the adaptation are deterministic, so it would repeat it).
    """
    torch.set_num_threads(1)
    wanted = None if methods is None else {m.split("+")[0] for m in methods}
    cfg, inits = load_initialisations(run_dirs, None if wanted is None else sorted(wanted))
    task = evaluation_task(cfg, shift)
    budget = steps if steps is not None else cfg.adapt_steps
    bases = [b for b in ("transfer", "meta", "fomaml") if b in inits]
    points: list[Point] = []
    for k in shots:
        test_eps = draw_episodes(task, "test", episodes, k, query, seed + 1000 * k)
        val_eps = draw_episodes(task, "val", val_episodes, k, query, seed + 1000 * k + 1)
        for method in methods_for(bases, prototypes, task.kind):
            if methods is not None and method.name not in methods:
                continue
            state, out_dim, run_dir = inits[method.base]
            init = (state, out_dim)
            lr, val, summary = (
                choose_lr(
                    task,
                    method,
                    init,
                    val_eps,
                    lr_grid,
                    budget,
                    seed,
                    schedule,
                    (val_measured or {}).get((method.name, k)),
                )
                if len(lr_grid) > 1 or not method.fine_tune
                else (lr_grid[0], None, {})
            )
            if measured and (method.name, k, lr) in measured:
                mean, ci = measured[method.name, k, lr]
            else:
                scores = episode_scores(
                    task,
                    method,
                    init,
                    test_eps,
                    steps=budget if method.fine_tune else 0,
                    lr=lr or 0.0,
                    seed=seed,
                    schedule=schedule,
                )
                mean, ci = mean_ci95(scores)
            points.append(
                Point(
                    method.name,
                    k,
                    task.metric_name,
                    mean,
                    ci,
                    lr,
                    episodes,
                    run_dir,
                    method.label,
                    budget if method.fine_tune else 0,
                    val,
                    val_episodes if val is not None else 0,
                    {f"{r:g}": [m, se] for r, (m, se) in summary.items()},
                )
            )
    return {
        "task": cfg.task,
        "shift": shift,
        "n_way": task.meta_out_dim(),
        "steps": budget,
        "lr_grid": list(lr_grid),
        "lr_rule": LR_RULE,
        "schedule": schedule,
        "episodes": episodes,
        "val_episodes": val_episodes,
        "query_per_class": query,
        "points": [asdict(p) for p in points],
    }


def plot_curve(curve: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=120)
    by_method: dict[str, list[dict]] = {}
    for p in curve["points"]:
        by_method.setdefault(p["method"], []).append(p)
    for method, pts in by_method.items():
        pts.sort(key=lambda p: p["shots"])
        xs = [p["shots"] for p in pts]
        ys = [p["mean"] for p in pts]
        ci = [p["ci95"] for p in pts]
        label = LABELS.get(method) or pts[0].get("label") or method
        style = "--" if "+proto" in method else "-"
        ax.errorbar(xs, ys, yerr=ci, marker="o", capsize=3, linestyle=style, label=label)
    metric = curve["points"][0]["metric"] if curve["points"] else "accuracy"
    ax.set_xscale("log")
    ax.set_xticks(sorted({p["shots"] for p in curve["points"]}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("labelled examples per class at the new site")
    ax.set_ylabel(metric)
    shifted = ", shifted new sites" if curve.get("shift") else ""
    ax.set_title(
        f"{curve['task']}{shifted}: {curve['n_way']}-way, {curve['steps']} adaptation steps"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
