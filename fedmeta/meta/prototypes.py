"""Class prototypes on a model's embedding: the metric-based few-shot family.

A model built by a task splits into ``features`` (the embedding) and ``head``
(the last ``nn.Linear``). A class prototype is the mean embedding of that
class's support examples. Classifying by the nearest prototype in squared
Euclidean distance is the same as a linear head with weight ``2 p_c`` and bias
``-|p_c|^2`` (the ``|z|^2`` term is common to every class), so a prototype
classifier is a head, and fine-tuning can start from it.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


def embedding(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's embedding of ``x`` (its ``features`` module), flattened to [N, D]."""
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Module):
        raise TypeError(
            f"{type(model).__name__} has no 'features' module: a prototype head needs "
            "the model split into 'features' (embedding) and 'head' (last Linear)"
        )
    return features(x).reshape(len(x), -1)


def class_prototypes(emb: torch.Tensor, y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Mean embedding per class, shape [n_classes, D]; every class needs one example."""
    counts = torch.bincount(y, minlength=n_classes)
    if len(counts) > n_classes or bool((counts[:n_classes] == 0).any()):
        missing = [c for c in range(n_classes) if c >= len(counts) or counts[c] == 0]
        raise ValueError(
            f"prototypes need at least one support example per class; none for class(es) "
            f"{missing} of {n_classes}"
        )
    sums = torch.zeros(n_classes, emb.shape[1], dtype=emb.dtype, device=emb.device)
    sums.index_add_(0, y, emb)
    return sums / counts[:n_classes].to(emb.dtype).unsqueeze(1)


def prototype_spread(protos: torch.Tensor) -> float:
    """Mean squared distance of the prototypes to their mean (a temperature: > 0)."""
    spread = float(((protos - protos.mean(0)) ** 2).sum(1).mean())
    return spread if spread > 0 else 1.0


@torch.no_grad()
def prototype_head(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    temperature: float | Literal["spread"] = 1.0,
) -> nn.Module:
    """Replace ``model.head`` by the prototype classifier of the support set ``(x, y)``.

    Works for any number of classes (the head is rebuilt with ``n_classes``
    outputs); returns the model, changed in place. The logits are
    ``-|z - p_c|^2 / temperature`` up to a per-example constant, so the
    temperature never changes a prediction, only how confident the head is:
    ``"spread"`` divides by the prototypes' mean squared distance to their
    mean, which keeps the logit gaps of order 1 whatever the embedding's scale
    (a head to fine-tune from: raw squared distances of a few hundred saturate
    the softmax, and the first SGD steps then wreck the embedding).
    """
    old = getattr(model, "head", None)
    if not isinstance(old, nn.Linear):
        raise TypeError(
            f"{type(model).__name__} has no 'head' nn.Linear: a prototype head needs the "
            "model split into 'features' (embedding) and 'head' (last Linear)"
        )
    was_training = model.training
    model.eval()
    protos = class_prototypes(embedding(model, x), y, n_classes)
    model.train(was_training)
    if protos.shape[1] != old.in_features:
        raise ValueError(
            f"embedding has {protos.shape[1]} dimensions, head expects {old.in_features}"
        )
    head = nn.Linear(old.in_features, n_classes).to(
        device=old.weight.device, dtype=old.weight.dtype
    )
    t = prototype_spread(protos) if temperature == "spread" else float(temperature)
    if not t > 0:
        raise ValueError(f"prototype temperature must be > 0, got {temperature}")
    head.weight.copy_(2.0 * protos / t)
    head.bias.copy_(-(protos**2).sum(1) / t)
    model.head = head
    return model
