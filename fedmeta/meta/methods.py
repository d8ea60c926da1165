"""The few-shot methods compared at a new site, and how one episode is scored.

Every method starts from an initialisation and may take the same budget of
full-batch SGD steps on the support set:

* ``scratch``            a fresh random model, fine-tuned (traditional ML);
* ``transfer``           the FedAvg model with a fresh zero N-way head, fine-tuned;
* ``meta`` / ``fomaml``  the Reptile / FOMAML initialisation (its own head), adapted;
* ``<base>+proto``       the prototype classifier on that model's embedding
                         (``fedmeta.meta.prototypes``): no gradient step at the site;
* ``<base>+proto-ft``    the prototype head as the starting head, then fine-tuned.

A method that takes steps has its adaptation learning rate chosen on
validation classes (``fedmeta.meta.curve``); a prototype classifier has none.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from fedmeta.data.tasks.base import Episode, Task
from fedmeta.meta.adaptation import Schedule, adapt, initial_model, score
from fedmeta.meta.batched import adapt_and_score, same_shapes
from fedmeta.meta.prototypes import prototype_head

Head = Literal["own", "proto"]
BASE_OF_STRATEGY = {"fedavg": "transfer", "reptile": "meta", "fomaml": "fomaml"}
BASE_LABELS = {
    "scratch": "from scratch",
    "transfer": "FedAvg-transfer",
    "meta": "Reptile",
    "fomaml": "FOMAML",
}


@dataclass(frozen=True)
class Method:
    """One way to use (or not) a federated model at a new site."""

    name: str
    base: str  # "scratch", or the base method of a trained run (transfer, meta, fomaml)
    head: Head = "own"  # own: the model's head (a fresh zero head for transfer); proto
    fine_tune: bool = True
    #: the prototype head's temperature (``prototypes.prototype_head``): it never changes
    #: the no-step classifier, only the head fine-tuning starts from
    temperature: float | Literal["spread"] = "spread"

    @property
    def label(self) -> str:
        text = BASE_LABELS.get(self.base, self.base)
        if self.head == "proto":
            text += " + prototypes" + (" + fine-tuning" if self.fine_tune else "")
        return text


def methods_for(
    bases: Sequence[str], prototypes: bool = True, kind: str = "classification"
) -> list[Method]:
    """Scratch, each trained base, and (classification) its two prototype variants."""
    out = [Method("scratch", "scratch")]
    for base in bases:
        out.append(Method(base, base))
        if prototypes and kind == "classification":
            out.append(Method(f"{base}+proto", base, "proto", fine_tune=False))
            out.append(Method(f"{base}+proto-ft", base, "proto", fine_tune=True))
    return out


def draw_episodes(
    task: Task, split: str, n: int, shots: int, query: int, seed: int
) -> list[Episode]:
    """``n`` episodes fixed by ``seed``: every method sees exactly these."""
    rng = np.random.default_rng(seed)
    return [task.eval_episode(split, rng, shots, query) for _ in range(n)]  # type: ignore[arg-type]


def initial_states(
    task: Task,
    method: Method,
    init: tuple[Mapping[str, torch.Tensor] | None, int],
    episodes: Sequence[Episode],
    seed: int,
    device: str = "cpu",
) -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    """(architecture, the parameters each episode starts from) for ``method``."""
    state, out_dim = init
    if method.base == "scratch":
        states = [
            dict(initial_model(task, None, 0, seed + e).state_dict()) for e in range(len(episodes))
        ]
        return task.build_model(task.meta_out_dim()), states
    base = initial_model(task, state, out_dim, seed).to(device)
    shared = {k: v.detach() for k, v in base.state_dict().items()}
    if method.head != "proto":
        return base, [shared] * len(episodes)
    states = []
    for episode in episodes:
        model = copy.deepcopy(base)
        prototype_head(
            model,
            torch.from_numpy(episode.support_x).to(device),
            torch.from_numpy(episode.support_y).to(device),
            task.meta_out_dim(),
            method.temperature,
        )
        states.append(
            {
                **shared,
                "head.weight": model.head.weight.detach(),
                "head.bias": model.head.bias.detach(),
            }
        )
    return base, states


def episode_scores_grid(
    task: Task,
    method: Method,
    init: tuple[Mapping[str, torch.Tensor] | None, int],
    episodes: Sequence[Episode],
    *,
    steps: int,
    lrs: Sequence[float],
    seed: int,
    device: str = "cpu",
    schedule: Schedule = "constant",
) -> dict[float, list[float]]:
    """The method's query score (accuracy or MSE) on each episode, for each rate in ``lrs``
    (``schedule``: the step size over the steps, ``adaptation.step_size``)."""
    model, states = initial_states(task, method, init, episodes, seed, device)
    if not method.fine_tune:
        steps, lrs = 0, [0.0]
    out: dict[float, list[float]] = {}
    if episodes and same_shapes(episodes):  # the same SGD, all episodes at once
        for lr in lrs:
            out[lr] = adapt_and_score(
                model, task, states, episodes, steps=steps, lr=lr, device=device, schedule=schedule
            )
        return out
    for lr in lrs:
        scores = []
        for episode, st in zip(episodes, states, strict=True):
            m = copy.deepcopy(model)
            m.load_state_dict(st)
            if steps:
                adapt(m, task, episode, steps, lr, device, schedule)
            scores.append(score(m, task, episode.query_x, episode.query_y, device))
        out[lr] = scores
    return out


def episode_scores(
    task: Task,
    method: Method,
    init: tuple[Mapping[str, torch.Tensor] | None, int],
    episodes: Sequence[Episode],
    *,
    steps: int,
    lr: float,
    seed: int,
    device: str = "cpu",
    schedule: Schedule = "constant",
) -> list[float]:
    """The method's query score (accuracy or MSE) on each episode."""
    grid = episode_scores_grid(
        task,
        method,
        init,
        episodes,
        steps=steps,
        lrs=[lr],
        seed=seed,
        device=device,
        schedule=schedule,
    )
    return next(iter(grid.values()))
