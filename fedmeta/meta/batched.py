"""Many episodes adapted at once: the same full-batch SGD as ``adaptation.adapt``, vectorised.

Every episode of one shot count has the same shapes, so the per-episode
models (one parameter set each) are trained side by side with
``torch.func.vmap`` over ``functional_call``: step for step the same plain
SGD update ``p <- p - lr * grad`` on the support set as the sequential loop,
without its per-episode Python overhead. Evaluation of a protocol (hundreds
of episodes x a grid of rates x shot counts) is dominated by that overhead
on a CPU, which is why this exists.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from fedmeta.data.tasks.base import Episode, Task
from fedmeta.meta.adaptation import Schedule, step_size

CHUNK = 100


def same_shapes(episodes: Sequence[Episode]) -> bool:
    """Whether the episodes can be stacked (equal support and query shapes)."""
    first = episodes[0]
    return all(
        e.support_x.shape == first.support_x.shape
        and e.query_x.shape == first.query_x.shape
        and e.support_y.shape == first.support_y.shape
        and e.query_y.shape == first.query_y.shape
        for e in episodes
    )


def _stack(
    states: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str]
) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k].detach() for s in states]) for k in names}


def adapt_and_score(
    model: nn.Module,
    task: Task,
    states: Sequence[Mapping[str, torch.Tensor]],
    episodes: Sequence[Episode],
    *,
    steps: int,
    lr: float,
    device: str = "cpu",
    schedule: Schedule = "constant",
) -> list[float]:
    """Each episode's query score after ``steps`` full-batch SGD steps from its state
    (step t at ``adaptation.step_size(lr, t, steps, schedule)``).

    ``model`` gives the architecture (its buffers are shared); ``states[i]`` holds
    episode i's starting parameters. Scores as ``adaptation.score``: accuracy for
    classification, MSE for regression.
    """
    if not episodes:
        return []
    if not same_shapes(episodes):
        raise ValueError("episodes of different shapes cannot be adapted together")
    model = model.to(device).train()
    names = [n for n, _ in model.named_parameters()]
    buffers = {k: v.to(device) for k, v in model.named_buffers()}
    loss_fn = task.loss_fn()
    classification = task.kind == "classification"

    def loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, {**params, **buffers}, (x,)), y)

    def metric(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**params, **buffers}, (x,))
        if classification:
            return (out.argmax(1) == y).float().mean()
        return ((out.view_as(y) - y) ** 2).mean()

    step_grad = vmap(grad(loss))
    scores: list[float] = []
    for lo in range(0, len(episodes), CHUNK):
        part = episodes[lo : lo + CHUNK]
        params = {k: v.to(device) for k, v in _stack(states[lo : lo + CHUNK], names).items()}
        sx = torch.from_numpy(np.stack([e.support_x for e in part])).to(device)
        sy = torch.from_numpy(np.stack([e.support_y for e in part])).to(device)
        for t in range(steps):
            g = step_grad(params, sx, sy)
            rate = step_size(lr, t, steps, schedule)
            params = {k: (p - rate * g[k]).detach() for k, p in params.items()}
        qx = torch.from_numpy(np.stack([e.query_x for e in part])).to(device)
        qy = torch.from_numpy(np.stack([e.query_y for e in part])).to(device)
        with torch.no_grad():
            model.eval()
            scores += [float(s) for s in vmap(metric)(params, qx, qy)]
            model.train()
    return scores
