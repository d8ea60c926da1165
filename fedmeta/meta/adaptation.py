"""Few-shot adaptation and meta-evaluation.

To judge an initialisation: copy it, take ``steps`` full-batch SGD steps on an
episode's support set, measure on its query set (accuracy, or MSE for
regression), and also measure the un-adapted copy. A FedAvg model trained on
fixed global labels gets a fresh N-way head first ("transfer learning"); a
model trained from scratch starts from a fresh random initialisation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from fedmeta.data.tasks.base import Episode, Split, Task
from fedmeta.meta.models import replace_head


@torch.no_grad()
def score(model: nn.Module, task: Task, x: np.ndarray, y: np.ndarray, device: str) -> float:
    model.eval()
    out = model(torch.from_numpy(x).to(device))
    target = torch.from_numpy(y).to(device)
    model.train()
    if task.kind == "classification":
        return float((out.argmax(1) == target).float().mean())
    return float(((out.view_as(target) - target) ** 2).mean())


Schedule = Literal["constant", "cosine"]


def step_size(lr: float, step: int, steps: int, schedule: Schedule = "constant") -> float:
    """The rate of step ``step`` (0-based) of ``steps``: ``lr`` throughout, or cosine-decayed
    from ``lr`` at the first step towards 0 after the last (half a cosine period)."""
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
    raise ValueError(f"schedule {schedule!r}: expected 'constant' or 'cosine'")


def adapt(
    model: nn.Module,
    task: Task,
    episode: Episode,
    steps: int,
    lr: float,
    device: str,
    schedule: Schedule = "constant",
) -> nn.Module:
    """Full-batch SGD on the support set, in place; returns the model."""
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = task.loss_fn()
    x = torch.from_numpy(episode.support_x).to(device)
    y = torch.from_numpy(episode.support_y).to(device)
    for t in range(steps):
        for group in opt.param_groups:
            group["lr"] = step_size(lr, t, steps, schedule)
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = loss_fn(out, y)
        loss.backward()
        opt.step()
    return model


def initial_model(
    task: Task, state: Mapping[str, torch.Tensor] | None, trained_out_dim: int, seed: int
) -> nn.Module:
    """The model adaptation starts from: a trained state, or scratch when ``state`` is None."""
    torch.manual_seed(seed)
    if state is None:
        return task.build_model(task.meta_out_dim())
    model = task.build_model(trained_out_dim)
    model.load_state_dict(state)
    if trained_out_dim != task.meta_out_dim():
        replace_head(model, task.meta_out_dim())
    return model


@dataclass(frozen=True)
class EvalResult:
    metric: str
    adapted: float
    adapted_ci95: float
    unadapted: float
    episodes: int

    def as_metrics(self, prefix: str = "eval") -> dict[str, float]:
        return {
            f"{prefix}-{self.metric}-adapted": self.adapted,
            f"{prefix}-{self.metric}-adapted-ci95": self.adapted_ci95,
            f"{prefix}-{self.metric}-unadapted": self.unadapted,
        }


def mean_ci95(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    if len(arr) < 2:
        return float(arr.mean()), float("nan")
    return float(arr.mean()), float(1.96 * arr.std(ddof=1) / math.sqrt(len(arr)))


def meta_evaluate(
    task: Task,
    state: Mapping[str, torch.Tensor] | None,
    trained_out_dim: int,
    *,
    split: Split,
    episodes: int,
    shots: int,
    query: int,
    steps: int,
    lr: float,
    seed: int,
    device: str = "cpu",
) -> EvalResult:
    """Adapted and un-adapted score of an initialisation over ``episodes`` episodes.

    Episodes depend only on ``seed``, so two initialisations evaluated with the
    same seed see exactly the same support and query sets.
    """
    from fedmeta.meta.methods import Method, draw_episodes, episode_scores

    drawn = draw_episodes(task, split, episodes, shots, query, seed)
    method = Method("scratch", "scratch") if state is None else Method("init", "init")
    init = (state, trained_out_dim)
    adapted = episode_scores(
        task, method, init, drawn, steps=steps, lr=lr, seed=seed, device=device
    )
    before = episode_scores(task, method, init, drawn, steps=0, lr=lr, seed=seed, device=device)
    mean, ci = mean_ci95(adapted)
    return EvalResult(task.metric_name, mean, ci, float(np.mean(before)), episodes)
