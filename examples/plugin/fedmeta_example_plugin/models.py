"""A model factory for fedmeta's ``--model`` option: ``factory(out_dim, task)``."""

from __future__ import annotations

from torch import nn

from fedmeta.data.tasks.base import Task
from fedmeta.meta.models import MLP


def wide_mlp(out_dim: int, task: Task) -> nn.Module:
    """A two-hidden-layer MLP for any task whose records are vectors (``features``
    then a Linear ``head``, as prototype heads and fedmeta adapt need)."""
    shape = task.input_shape()
    if len(shape) != 1:
        raise ValueError(f"wide_mlp needs vector records, the task's are {shape}")
    return MLP(shape[0], (64, 64), out_dim)
