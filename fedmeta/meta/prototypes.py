"""Class prototypes on a model's embedding: the metric-based few-shot family.

A model built by a task splits into ``features`` (the embedding) and ``head``
(the last ``nn.Linear``). A class prototype is the mean embedding of that
class's support examples. Classifying by the nearest prototype in squared
Euclidean distance is the same as a linear head with weight ``2 p_c`` and bias
``-|p_c|^2`` (the ``|z|^2`` term is common to every class), so a prototype
classifier is a head, and fine-tuning can start from it.
"""

from __future__ import annotations

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


@torch.no_grad()
def prototype_head(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n_classes: int) -> nn.Module:
    """Replace ``model.head`` by the prototype classifier of the support set ``(x, y)``.

    Works for any number of classes (the head is rebuilt with ``n_classes``
    outputs); returns the model, changed in place.
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
    head = nn.Linear(old.in_features, n_classes).to(device=old.weight.device,
                                                       dtype=old.weight.dtype)
    head.weight.copy_(2.0 * protos)
    head.bias.copy_(-(protos**2).sum(1))
    model.head = head
    return model
