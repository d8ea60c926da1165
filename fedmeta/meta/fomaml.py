"""First-order MAML's site update: the gradient at the adapted weights.

A site splits its round's episode, class by class, into a support part and a
held-out part; it adapts theta with the inner loop on the support part (giving
phi), then takes the loss gradient g at phi on the held-out part. It replies
``theta - s g`` with ``s = inner lr x inner steps`` (the length of the path a
Reptile site walks with the same settings, so one meta step size beta serves
both strategies): the server's Reptile-shaped step (Flower's FedAvgM with
server learning rate beta) then gives

    theta <- theta + beta * sum_i w_i ((theta - s g_i) - theta) = theta - beta s sum_i w_i g_i,

which is FOMAML's outer SGD step with learning rate beta * s. So FOMAML reuses
Flower's aggregation exactly as Reptile does; only the site update differs.

Non-private only: the held-out gradient is an un-noised statistic of the
site's records, so a run config with DP refuses the strategy
(``fedmeta.config``) rather than release it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedmeta.data.tasks.base import Pool
from fedmeta.privacy.dp_training import StepsResult, train_steps

HELD_OUT_FRACTION = 0.5


def split_episode(
    pool: Pool, rng: np.random.Generator, held_out_fraction: float = HELD_OUT_FRACTION
) -> tuple[Pool, Pool]:
    """(support, held-out) parts of an episode's pool.

    Classification pools are split within each label, so both parts hold
    every class (each label needs two records); a regression pool (one
    function) is split over its points. At least one record goes to each part.
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    y = np.asarray(pool.y)
    groups = (
        [np.flatnonzero(y == c) for c in np.unique(y)]
        if y.dtype.kind in "iu"
        else [np.arange(len(y))]
    )
    support, held = [], []
    for members in groups:
        if len(members) < 2:
            raise ValueError(
                "FOMAML needs at least 2 records per class in an episode "
                "(one to adapt on, one held out)"
            )
        members = rng.permutation(members)
        n_held = min(len(members) - 1, max(1, round(held_out_fraction * len(members))))
        held.append(members[:n_held])
        support.append(members[n_held:])
    s, h = np.sort(np.concatenate(support)), np.sort(np.concatenate(held))

    def part(idx: np.ndarray) -> Pool:
        units = None if pool.units is None else pool.units[idx]
        return Pool(pool.x[idx], pool.y[idx], units)

    return part(s), part(h)


def held_out_gradient(
    model: nn.Module, held_out: Pool, loss_fn: nn.Module, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Gradient of the mean loss on ``held_out`` at the model's current weights."""
    model.to(device).train()
    model.zero_grad(set_to_none=True)
    x = torch.from_numpy(np.ascontiguousarray(held_out.x)).to(device)
    y = torch.from_numpy(np.ascontiguousarray(held_out.y)).to(device)
    loss_fn(model(x), y).backward()
    grads = {
        name: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for name, p in model.named_parameters()
    }
    model.zero_grad(set_to_none=True)
    return grads


def fomaml_site_update(
    model: nn.Module,
    pool: Pool,
    rng: np.random.Generator,
    *,
    loss_fn: nn.Module,
    steps: int,
    lr: float,
    batch_size: int,
    device: str = "cpu",
    seed: int = 0,
    scale: float | None = None,
) -> tuple[dict[str, torch.Tensor], StepsResult]:
    """FOMAML's reply ``theta - scale * g`` for the model's current weights theta.

    ``steps`` SGD steps (batch ``batch_size``) on the support part give phi;
    g is the held-out part's gradient at phi; ``scale`` defaults to
    ``lr * steps``. Non-private (see module doc).
    """
    scale = lr * steps if scale is None else scale
    theta = {k: v.detach().clone() for k, v in model.state_dict().items()}
    support, held_out = split_episode(pool, rng)
    result = train_steps(
        model,
        support,
        loss_fn=loss_fn,
        steps=steps,
        lr=lr,
        batch_size=min(batch_size, len(support.x)),
        dp=None,
        device=device,
        seed=seed,
    )
    grads = held_out_gradient(model, held_out, loss_fn, device)
    reply = {k: (v - scale * grads[k].to(v.device) if k in grads else v) for k, v in theta.items()}
    return {k: v.detach().cpu() for k, v in reply.items()}, result
