"""A new site adapts the federation's model to its own labelled examples.

1. receive the model and check it against the run's signed audit log (provenance);
2. read the site's labelled data with a bundled loader, shaped for the model;
3. take ``shots`` examples per class as the support set (all, if not given; the
   rest are held back and scored, as an honest estimate on the site's own data);
4. re-initialise the head from the class prototypes of the support embeddings
   (any number of classes), then fine-tune the whole model with full-batch SGD for
   as many steps as cross-validation on the support set supports (possibly none);
   a meta-learned N-way head competes when the site has N classes;
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
from fedmeta.data.tasks.base import Task, TaskError
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
    choice: Choice
    #: regression: mean squared error on the held-back examples (accuracy stays None)
    held_back_mse: float | None = None


def support_split(y: np.ndarray, shots: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(support indices, held-back indices): ``shots`` per class, drawn with ``seed``."""
    if shots is None:
        return np.arange(len(y)), np.array([], dtype=np.int64)
    rng = np.random.default_rng(seed)
    sup, rest = [], []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        if len(members) < shots:
            raise DataError(
                f"class {int(c)} has {len(members)} labelled examples, fewer than --shots {shots}"
            )
        sup.append(members[:shots])
        rest.append(members[shots:])
    return np.sort(np.concatenate(sup)), np.sort(np.concatenate(rest))


def site_data(
    task: Task, data: Path | str | Loaded, *, labelled: bool = True, split: str = "train"
) -> Loaded:
    """The site's data read for this task's model (images resized to its input)."""
    if isinstance(data, Loaded):
        return data
    shape = tuple(task.input_shape())
    loaded = load_data(Path(data), shape, labelled=labelled, split=split)
    got = tuple(loaded.records.x.shape[1:])
    if got != shape:
        raise DataError(
            f"{data}: records have shape {got}, the model expects {shape} "
            "(for a CSV: the same feature columns as the federation)"
        )
    return loaded


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    out = model(torch.from_numpy(x))
    model.train()
    return float((out.argmax(1).numpy() == y).mean())


#: logits of a fresh prototype head are scaled to this mean magnitude: the support set is
#: then classified with confidence, and fine-tuning moves the features only where it errs
PROTOTYPE_SCALE = 10.0
#: the prototype head is fine-tuned at this share of the run's adaptation rate (a sharp
#: head and the run's full rate, tuned for a meta-learned head, overshoot in a few steps)
PROTOTYPE_LR_SHARE = 0.1
#: cross-validation on the support set repeats its two-fold split this many times
CV_REPEATS = 3


@torch.no_grad()
def temper(head: nn.Module, scale: float = PROTOTYPE_SCALE) -> None:
    """Rescale the prototype head so that its mean |bias| is ``scale``: the same
    classifier (a positive factor keeps every argmax), with logits of a chosen size
    instead of the embedding's squared norm."""
    mean = float(head.bias.abs().mean())
    if mean > 0:
        head.weight *= scale / mean
        head.bias *= scale / mean


@dataclass(frozen=True)
class Choice:
    """What support-set cross-validation chose: the head to start from and the steps."""

    head: Literal["prototypes", "meta-learned", "own"]  # own: a regression model's output
    steps: int
    lr: float
    cv_accuracy: float | None


def start_from(
    net: nn.Module, head: str, x: np.ndarray, y: np.ndarray, n_classes: int
) -> nn.Module:
    """A copy of ``net`` with its meta-learned head, or with a (tempered) prototype head
    built from ``(x, y)``."""
    net = copy.deepcopy(net)
    if head == "meta-learned":
        return net
    try:
        prototype_head(net, torch.from_numpy(x), torch.from_numpy(y), n_classes)
    except (TypeError, ValueError) as exc:
        raise TaskError(f"cannot build a prototype head: {exc}") from None
    temper(net.head)
    return net


def tune(
    net: nn.Module,
    task: Task,
    x: np.ndarray,
    y: np.ndarray,
    steps: int,
    lr: float,
    check: tuple[np.ndarray, np.ndarray] | None = None,
    at: tuple[int, ...] = (),
) -> dict[int, float]:
    """Full-batch SGD of the whole model on ``(x, y)`` for ``steps`` steps, in place;
    with ``check``, its accuracy after each step count in ``at`` (0 = before tuning)."""
    scores: dict[int, float] = {}
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    loss_fn = task.loss_fn()
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    net.train()
    for k in range(steps + 1):
        if check is not None and k in at:
            scores[k] = accuracy(net, *check)
        if k == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss_fn(net(xs), ys).backward()
        opt.step()
    return scores


def step_grid(steps: int) -> tuple[int, ...]:
    """The step counts cross-validation compares: 0, a quarter, half and all of ``steps``."""
    return tuple(sorted({0, steps // 4, steps // 2, steps}))


def folds(y: np.ndarray, n_classes: int, seed: int) -> np.ndarray | None:
    """A boolean mask splitting each class in half; None when a class has fewer than four
    examples (each side needs two of every class to score and to build prototypes from
    more than a single example)."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(y), dtype=bool)
    for c in range(n_classes):
        idx = rng.permutation(np.flatnonzero(y == c))
        if len(idx) < 4:
            return None
        fold[idx[: len(idx) // 2]] = True
    return fold


def choose(
    net: nn.Module,
    task: Task,
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    steps: int,
    lr: float,
    meta_head: bool,
    seed: int,
) -> Choice:
    """The head (prototypes, or the meta-learned head when ``meta_head``) and the number of
    fine-tuning steps, by two-fold cross-validation on the support set (each class split
    in half; the head is built and tuned on one half and scored on the other; ties go
    to prototypes and to fewer steps), the split repeated ``CV_REPEATS`` times. Early
    stopping by the support set alone: the data the model will be used on are never
    looked at. With fewer than four examples of a class, the prototype head is kept
    untuned (too few to tell a helpful step from an overfitting one)."""
    proto_lr = lr * PROTOTYPE_LR_SHARE
    splits = [folds(y, n_classes, seed + r) for r in range(CV_REPEATS)]
    if steps == 0 or lr == 0 or splits[0] is None:
        return Choice("prototypes", 0, proto_lr, None)
    grid = step_grid(steps)
    candidates = [("prototypes", k, proto_lr) for k in grid]
    if meta_head:
        candidates += [("meta-learned", k, lr) for k in grid if k > 0]
    score = dict.fromkeys(candidates, 0.0)
    for fold in splits:
        for train in (fold, ~fold):
            for head, rate in {(h, r) for h, _, r in candidates}:
                tuned = start_from(net, head, x[train], y[train], n_classes)
                got = tune(
                    tuned, task, x[train], y[train], steps, rate, (x[~train], y[~train]), grid
                )
                for k, acc in got.items():
                    if (head, k, rate) in score:
                        score[(head, k, rate)] += acc / (2 * len(splits))
    best = max(candidates, key=lambda c: (score[c], c[0] == "prototypes", -c[1]))
    return Choice(best[0], best[1], best[2], score[best])


def adapt_model(
    model: Path | str,
    data: Path | str | Loaded,
    *,
    shots: int | None = None,
    out: Path | str | None = None,
    steps: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    public_key: Path | None = None,
    audit_log: Path | None = None,
    init: Init = "federated",
) -> Adapted:
    """Adapt the run's final model (a run directory or its ``final_model.pt``) to the
    labelled data at ``data``; see the module docstring. ``init="scratch"`` runs the same
    procedure from a fresh random model (the baseline a site would have without the
    federation). Returns :class:`Adapted`; writes it to ``out`` when given."""
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    received = receive(Path(model), public_key, audit_log)
    cfg = RunConfig.load(received.config_path)
    task = build_task(cfg)
    loaded = site_data(task, data)
    check_labels(task, cfg.task, loaded, data)
    records = loaded.records
    if task.kind == "regression":
        from fedmeta.newsite.regression import adapt_regression

        return adapt_regression(
            received,
            cfg,
            task,
            loaded,
            shots=shots,
            out=out,
            steps=steps,
            lr=lr,
            seed=seed,
            init=init,
        )
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
    meta_ok = (
        init == "federated"
        and cfg.strategy in ("reptile", "fomaml")
        and n_classes == task.meta_out_dim()
    )
    x_sup, y_sup = records.x[sup], records.y[sup]
    chosen = choose(net, task, x_sup, y_sup, n_classes, steps, lr, meta_ok, seed)
    net = start_from(net, chosen.head, x_sup, y_sup, n_classes)
    tune(net, task, x_sup, y_sup, chosen.steps, chosen.lr)
    held = accuracy(net, records.x[rest], records.y[rest]) if len(rest) else None
    provenance = {**received.provenance, "init": init}
    result = Adapted(
        None, tuple(loaded.classes), len(sup), len(rest), held, provenance, net, chosen
    )
    settings = adaptation_settings(shots, sup, rest, steps, lr, seed, chosen)
    settings["held_back_accuracy"] = held
    return saved(result, out, cfg, loaded, settings)


def adaptation_settings(
    shots: int,
    sup: np.ndarray,
    rest: np.ndarray,
    steps: int,
    lr: float,
    seed: int,
    chosen: Choice,
) -> dict[str, Any]:
    """What the adapted file records of how it was adapted (both kinds of model)."""
    return {
        "shots": shots,
        "support_examples": int(len(sup)),
        "steps": steps,
        "lr": lr,
        "seed": seed,
        "head": chosen.head,
        "steps_used": chosen.steps,
        "lr_used": chosen.lr,
        "cv_accuracy": chosen.cv_accuracy,
        "held_back_examples": int(len(rest)),
    }


def saved(
    result: Adapted,
    out: Path | str | None,
    cfg: RunConfig,
    loaded: Loaded,
    settings: dict[str, Any],
    kind: str = "classification",
) -> Adapted:
    """``result``, written to ``out`` (with its path) when one is given."""
    if out is None:
        return result
    path = save_adapted(Path(out), result.model, cfg, loaded, result.provenance, settings, kind)
    return replace(result, path=path)


def check_labels(task: Task, task_name: str, loaded: Loaded, data: object) -> None:
    """The site's labels are of the model's kind: class labels for a classifier, numbers
    for a regression model (one line naming the data and what to change)."""
    if task.kind == "regression" and loaded.classes:
        raise DataError(
            f"{data}: labelled with classes, but the federation's model "
            f"(task {task_name!r}) predicts a number; give numeric labels "
            '(a CSV schema with task = "regression")'
        )
    if task.kind == "classification" and loaded.records.y.dtype.kind == "f":
        raise DataError(
            f"{data}: labelled with numbers, but the federation's model "
            f"(task {task_name!r}) predicts classes; give class labels (a CSV "
            'schema with task = "classification")'
        )


def save_adapted(
    path: Path,
    net: nn.Module,
    cfg: RunConfig,
    loaded: Loaded,
    provenance: dict[str, Any],
    adaptation: dict[str, Any],
    kind: str = "classification",
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": ADAPTED_FORMAT,
            "state_dict": {k: v.detach().cpu() for k, v in copy.deepcopy(net).state_dict().items()},
            "config": cfg.to_flat(),
            "task": cfg.task,
            "model": cfg.model,
            "kind": kind,
            "classes": list(loaded.classes),
            "preprocessing": loaded.preprocessing,
            "provenance": provenance,
            "adaptation": adaptation,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        path,
    )
    return path


__all__ = ["ADAPTED_FORMAT", "Adapted", "ProvenanceError", "adapt_model", "save_adapted"]
