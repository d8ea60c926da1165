"""A new site adapts a regression model (no classes, no prototypes): the whole model,
output included, is fine-tuned on the site's labelled records, as ``fedmeta evaluate``
adapts it, and predicts values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmeta.config import RunConfig, adapt_lr
from fedmeta.data.loaders import DataError, Loaded
from fedmeta.data.tasks.base import Task
from fedmeta.newsite.adapting import Adapted, Choice, Init, adaptation_settings, saved


def regression_split(n: int, shots: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(support, held back) for a regression site: ``shots`` records in all."""
    if shots is None:
        return np.arange(n), np.array([], dtype=np.int64)
    if shots > n:
        raise DataError(f"the site has {n} labelled records, fewer than --shots {shots}")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:shots]), np.sort(order[shots:])


@torch.no_grad()
def mse(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    out = model(torch.from_numpy(x))
    model.train()
    return float(((out.view(len(y), -1).squeeze(1) - torch.from_numpy(y)) ** 2).mean())


def adapt_regression(
    received: Any,
    cfg: RunConfig,
    task: Task,
    loaded: Loaded,
    *,
    shots: int | None,
    out: Path | str | None,
    steps: int | None,
    lr: float | None,
    seed: int,
    init: Init,
) -> Adapted:
    """A regression model keeps its output (no classes, no prototypes): the whole model is
    fine-tuned on ``shots`` labelled records (all if None) with full-batch SGD for the
    run's adaptation steps and rate, as ``fedmeta evaluate`` adapts it; the rest are held
    back and their mean squared error reported."""
    records = loaded.records
    sup, rest = regression_split(len(records), shots, seed)
    torch.manual_seed(seed)
    net = task.build_model(int(received.saved.get("out_dim", task.meta_out_dim())))
    if init == "federated":
        net.load_state_dict(received.state)
    steps = cfg.adapt_steps if steps is None else steps
    lr = adapt_lr(cfg, task) if lr is None else lr
    y = records.y.astype(np.float32).reshape(len(records), -1)
    tune_regression(net, task, records.x[sup], y[sup], steps, lr)
    held = mse(net, records.x[rest], y[rest].squeeze(1)) if len(rest) else None
    chosen = Choice("own", steps, lr, None)
    provenance = {**received.provenance, "init": init}
    result = Adapted(None, (), len(sup), len(rest), None, provenance, net, chosen, held)
    settings = adaptation_settings(shots, sup, rest, steps, lr, seed, chosen)
    settings["held_back_mse"] = held
    return saved(result, out, cfg, loaded, settings, kind="regression")


def tune_regression(
    net: nn.Module, task: Task, x: np.ndarray, y: np.ndarray, steps: int, lr: float
) -> None:
    """Full-batch SGD of the whole model on numeric targets ``y`` ([N, outputs])."""
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    loss_fn = task.loss_fn()
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    net.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(net(xs).view_as(ys), ys).backward()
        opt.step()
