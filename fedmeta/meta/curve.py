"""The curve the product exists to bend: accuracy at a new site against labelled examples.

For each number of shots K, three initialisations are adapted with the same
budget (steps) on the same N-way K-shot episodes of held-out classes:

* ``scratch``   — a fresh random model ("traditional ML" at the new site),
* ``transfer``  — the FedAvg model with a fresh N-way head, fine-tuned,
* ``meta``      — the Reptile initialisation, adapted.

Each method's adaptation learning rate is chosen from the same grid on the
validation classes (fair comparison), then measured on the test classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fedmeta.config import RunConfig, build_task
from fedmeta.meta.adaptation import meta_evaluate
from fedmeta.metrics import CONFIG_FILE, load_model

METHOD_OF_STRATEGY = {"reptile": "meta", "fedavg": "transfer"}
LABELS = {"scratch": "from scratch (traditional ML)", "transfer": "FedAvg + fine-tuning (transfer)",
          "meta": "Reptile (meta-learning)"}


class CurveError(ValueError):
    """Run directories that cannot be compared (one line)."""


@dataclass(frozen=True)
class Point:
    method: str
    shots: int
    metric: str
    mean: float
    ci95: float
    lr: float
    episodes: int
    run_dir: str | None


def load_initialisations(run_dirs: Sequence[Path]) -> tuple[RunConfig, dict[str, Any]]:
    """(config of the first run, method -> (state, out_dim, run_dir)) incl. scratch."""
    inits: dict[str, Any] = {"scratch": (None, 0, None)}
    first: RunConfig | None = None
    for run_dir in run_dirs:
        cfg = RunConfig.load(Path(run_dir) / CONFIG_FILE)
        if first and (cfg.task, cfg.n_way) != (first.task, first.n_way):
            raise CurveError(f"{run_dir}: task {cfg.task} ({cfg.n_way}-way) differs from "
                             f"{first.task} ({first.n_way}-way); compare runs of one task")
        first = first or cfg
        saved = load_model(Path(run_dir))
        method = METHOD_OF_STRATEGY[cfg.strategy]
        if method in inits:
            raise CurveError(f"{run_dir}: a second {cfg.strategy} run; give one per strategy")
        inits[method] = (saved["state_dict"], int(saved["out_dim"]), str(run_dir))
    if first is None:
        raise CurveError("no run directory given")
    return first, inits


def shots_curve(
    run_dirs: Sequence[Path],
    shots: Sequence[int],
    *,
    episodes: int = 100,
    val_episodes: int = 25,
    steps: int | None = None,
    lr_grid: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0),
    query: int = 15,
    seed: int = 0,
) -> dict[str, Any]:
    torch.set_num_threads(1)
    cfg, inits = load_initialisations(run_dirs)
    task = build_task(cfg)
    budget = steps if steps is not None else cfg.adapt_steps
    points: list[Point] = []
    for k in shots:
        for method, (state, out_dim, run_dir) in inits.items():
            def run(split: str, lr: float, n: int, state=state, out_dim=out_dim, k=k):
                return meta_evaluate(task, state, out_dim, split=split, episodes=n, shots=k,
                                     query=query, steps=budget, lr=lr, seed=seed + 1000 * k)
            better = (lambda a, b: a > b) if task.kind == "classification" else (lambda a, b: a < b)
            best_lr, best = lr_grid[0], None
            if len(lr_grid) > 1:
                for lr in lr_grid:
                    val = run("val", lr, val_episodes).adapted
                    if best is None or better(val, best):
                        best_lr, best = lr, val
            res = run("test", best_lr, episodes)
            points.append(Point(method, k, res.metric, res.adapted, res.adapted_ci95, best_lr,
                                episodes, run_dir))
    return {"task": cfg.task, "n_way": task.meta_out_dim(), "steps": budget,
            "lr_grid": list(lr_grid), "episodes": episodes, "query_per_class": query,
            "points": [asdict(p) for p in points]}


def plot_curve(curve: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    by_method: dict[str, list[dict]] = {}
    for p in curve["points"]:
        by_method.setdefault(p["method"], []).append(p)
    for method, pts in by_method.items():
        pts.sort(key=lambda p: p["shots"])
        xs = [p["shots"] for p in pts]
        ys = [p["mean"] for p in pts]
        ci = [p["ci95"] for p in pts]
        ax.errorbar(xs, ys, yerr=ci, marker="o", capsize=3, label=LABELS.get(method, method))
    metric = curve["points"][0]["metric"] if curve["points"] else "accuracy"
    ax.set_xscale("log")
    ax.set_xticks(sorted({p["shots"] for p in curve["points"]}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("labelled examples per class at the new site")
    ax.set_ylabel(metric)
    ax.set_title(f"{curve['task']}: {curve['n_way']}-way, {curve['steps']} adaptation steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
