"""A new site adapts the federation's model to its own labelled examples.

1. receive the model and check it against the run's signed audit log (provenance);
2. read the site's labelled data with a bundled loader, shaped for the model;
3. take ``shots`` examples per class as the support set (all, if not given; the
   rest are held back and scored, as an honest estimate on the site's own data);
4. re-initialise the head from the class prototypes of the support embeddings
   (any number of classes), then fine-tune the whole model with full-batch SGD;
5. save the adapted model with its classes, preprocessing and provenance.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from fedmeta.config import RunConfig, adapt_lr, build_task
from fedmeta.data.loaders import DataError, Loaded, load_data
from fedmeta.data.tasks.base import Episode, Task, TaskError
from fedmeta.meta.adaptation import adapt as sgd_adapt
from fedmeta.meta.prototypes import prototype_head
from fedmeta.newsite.provenance import ProvenanceError, receive

ADAPTED_FORMAT = "fedmeta-adapted-model/1"
Init = Literal["federated", "scratch"]


@dataclass(frozen=True)
class Adapted:
    """An adapted model: where it was saved, its classes and what was measured."""

    path: Path | None
    classes: tuple[str, ...]
    support: int
    held_back: int
    held_back_accuracy: float | None
    provenance: dict[str, Any]
    model: nn.Module


def support_split(y: np.ndarray, shots: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(support indices, held-back indices): ``shots`` per class, drawn with ``seed``."""
    if shots is None:
        return np.arange(len(y)), np.array([], dtype=np.int64)
    rng = np.random.default_rng(seed)
    sup, rest = [], []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        if len(members) < shots:
            raise DataError(f"class {int(c)} has {len(members)} labelled examples, fewer than "
                            f"--shots {shots}")
        sup.append(members[:shots])
        rest.append(members[shots:])
    return np.sort(np.concatenate(sup)), np.sort(np.concatenate(rest))


def site_data(task: Task, data: Path | str | Loaded, *, labelled: bool = True,
              split: str = "train") -> Loaded:
    """The site's data read for this task's model (images resized to its input)."""
    if isinstance(data, Loaded):
        return data
    shape = tuple(task.input_shape())
    loaded = load_data(Path(data), shape, labelled=labelled, split=split)
    got = tuple(loaded.records.x.shape[1:])
    if got != shape:
        raise DataError(f"{data}: records have shape {got}, the model expects {shape} "
                        "(for a CSV: the same feature columns as the federation)")
    return loaded


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    out = model(torch.from_numpy(x))
    model.train()
    return float((out.argmax(1).numpy() == y).mean())


@torch.no_grad()
def temper(head: nn.Module) -> None:
    """Divide the prototype head by the mean squared prototype norm: the same classifier
    (a positive scale keeps every argmax), with logits of order one, so that fine-tuning
    starts well-conditioned instead of from logits as large as the embedding's norm."""
    scale = float(head.bias.abs().mean())
    if scale > 0:
        head.weight /= scale
        head.bias /= scale


@torch.no_grad()
def _support_fit(net: nn.Module, task: Task, x: np.ndarray, y: np.ndarray
                 ) -> tuple[float, float]:
    """(loss, accuracy) on the support set."""
    net.eval()
    out = net(torch.from_numpy(x))
    net.train()
    target = torch.from_numpy(y)
    return float(task.loss_fn()(out, target)), float((out.argmax(1) == target).float().mean())


def fine_tune(net: nn.Module, task: Task, x: np.ndarray, y: np.ndarray, steps: int,
              lr: float, retries: int = 3) -> tuple[nn.Module, float]:
    """Full-batch SGD from the prototype head, kept only if it fits the support set at
    least as well (lower loss, no lower accuracy); else retried at a quarter of the rate,
    and if no rate helps, the prototype classifier is kept (rate 0). Returns the model and
    the rate used. (A prototype head over small embeddings gives nearly flat logits, where
    a large step can trade accuracy for loss.)"""
    if steps == 0 or lr == 0:
        return net, 0.0
    start_loss, start_acc = _support_fit(net, task, x, y)
    episode = Episode(x, y, x[:0], y[:0])
    for _ in range(retries + 1):
        tuned = sgd_adapt(copy.deepcopy(net), task, episode, steps, lr, "cpu")
        loss, acc = _support_fit(tuned, task, x, y)
        if loss <= start_loss and acc >= start_acc:
            return tuned, lr
        lr /= 4
    return net, 0.0


def head_and_tune(net: nn.Module, task: Task, x: np.ndarray, y: np.ndarray, n_classes: int,
                  steps: int, lr: float, meta_head: bool) -> tuple[nn.Module, float]:
    """Fine-tune from the meta-learned head, or from a (tempered) prototype head; returns
    the adapted model (``net`` is changed) and the rate used."""
    if meta_head:
        episode = Episode(x, y, x[:0], y[:0])
        return sgd_adapt(net, task, episode, steps, lr, "cpu"), lr
    try:
        prototype_head(net, torch.from_numpy(x), torch.from_numpy(y), n_classes)
    except (TypeError, ValueError) as exc:
        raise TaskError(f"cannot build a prototype head: {exc}") from None
    temper(net.head)
    return fine_tune(net, task, x, y, steps, lr)


def choose_meta_head(net: nn.Module, task: Task, x: np.ndarray, y: np.ndarray,
                     n_classes: int, steps: int, lr: float, seed: int) -> bool:
    """Whether fine-tuning from the meta-learned head beats the prototype head, by two-fold
    cross-validation on the support set (each class split in half); False when a class has
    fewer than two support examples (no fold would hold every class)."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(y), dtype=bool)
    for c in range(n_classes):
        idx = rng.permutation(np.flatnonzero(y == c))
        if len(idx) < 2:
            return False
        fold[idx[: len(idx) // 2]] = True
    score = {True: 0.0, False: 0.0}
    for train in (fold, ~fold):
        for meta in (True, False):
            tuned, _ = head_and_tune(copy.deepcopy(net), task, x[train], y[train], n_classes,
                                     steps, lr, meta)
            score[meta] += accuracy(tuned, x[~train], y[~train])
    return score[True] >= score[False]


def adapt_model(model: Path | str, data: Path | str | Loaded, *, shots: int | None = None,
                out: Path | str | None = None, steps: int | None = None,
                lr: float | None = None, seed: int = 0, public_key: Path | None = None,
                audit_log: Path | None = None, init: Init = "federated") -> Adapted:
    """Adapt the run's final model (a run directory or its ``final_model.pt``) to the
    labelled data at ``data``; see the module docstring. ``init="scratch"`` runs the same
    procedure from a fresh random model (the baseline a site would have without the
    federation). Returns :class:`Adapted`; writes it to ``out`` when given."""
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    received = receive(Path(model), public_key, audit_log)
    cfg = RunConfig.load(received.config_path)
    task = build_task(cfg)
    if task.kind != "classification":
        raise TaskError(f"task {cfg.task!r} is a regression task; adapt handles "
                        "classification (class prototypes)")
    loaded = site_data(task, data)
    records = loaded.records
    sup, rest = support_split(records.y, shots, seed)
    n_classes = len(loaded.classes) or int(records.y.max()) + 1
    torch.manual_seed(seed)
    net = task.build_model(int(received.saved.get("out_dim", task.meta_out_dim())))
    if init == "federated":
        net.load_state_dict(received.state)
    steps = cfg.adapt_steps if steps is None else steps
    lr = adapt_lr(cfg, task) if lr is None else lr
    # a model meta-learned (Reptile, FOMAML) for N-way episodes is an initialisation for
    # fine-tuning its own head; with N classes at the site it competes with the prototype
    # head, and two-fold cross-validation on the support set decides (never the test data)
    meta_ok = (init == "federated" and cfg.strategy in ("reptile", "fomaml")
               and n_classes == task.meta_out_dim() and steps > 0 and lr > 0)
    x_sup, y_sup = records.x[sup], records.y[sup]
    meta_head = meta_ok and choose_meta_head(net, task, x_sup, y_sup, n_classes, steps, lr,
                                             seed)
    net, lr_used = head_and_tune(net, task, x_sup, y_sup, n_classes, steps, lr, meta_head)
    held = accuracy(net, records.x[rest], records.y[rest]) if len(rest) else None
    provenance = {**received.provenance, "init": init}
    result = Adapted(None, tuple(loaded.classes), len(sup), len(rest), held, provenance,
                     net)
    if out is not None:
        path = save_adapted(Path(out), net, cfg, loaded, provenance, {
            "shots": shots, "support_examples": int(len(sup)), "steps": steps, "lr": lr,
            "lr_used": lr_used,
            "seed": seed, "head": ("the meta-learned head, fine-tuned" if meta_head else
                                   "class prototypes of the support embeddings, fine-tuned"),
            "held_back_examples": int(len(rest)), "held_back_accuracy": held})
        result = replace(result, path=path)
    return result


def save_adapted(path: Path, net: nn.Module, cfg: RunConfig, loaded: Loaded,
                 provenance: dict[str, Any], adaptation: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "format": ADAPTED_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in copy.deepcopy(net).state_dict().items()},
        "config": cfg.to_flat(), "task": cfg.task, "model": cfg.model,
        "classes": list(loaded.classes), "preprocessing": loaded.preprocessing,
        "provenance": provenance, "adaptation": adaptation,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }, path)
    return path


__all__ = ["ADAPTED_FORMAT", "Adapted", "ProvenanceError", "adapt_model", "save_adapted"]
