"""The task interface: what a site trains on and how a model is judged.

A task knows how to split its bundled data over sites (non-IID), how to draw
a round's training pool at a site (an N-way episode for Reptile, all records
with fixed labels for the FedAvg baseline) and how to draw evaluation episodes
(support + query) from held-out classes or sites.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from fedmeta.data.records import Records

Kind = Literal["classification", "regression"]
Split = Literal["val", "test"]


class TaskError(ValueError):
    """A task cannot be built with the given settings (one line, names the setting)."""


@dataclass(frozen=True)
class Pool:
    """The records a site trains on in one round (labels possibly re-assigned).

    ``units`` is the privacy unit of each record (``None``: each record is one).
    """

    x: np.ndarray
    y: np.ndarray
    units: np.ndarray | None = None


@dataclass(frozen=True)
class Episode:
    """A few-shot problem: adapt on the support set, measure on the query set."""

    support_x: np.ndarray
    support_y: np.ndarray
    query_x: np.ndarray
    query_y: np.ndarray


class SampleMSELoss(nn.Module):
    """Mean squared error with one loss value per sample before reduction.

    ``nn.MSELoss(reduction="none")`` keeps the output's shape ([B, 1]), which
    Opacus's ghost clipping would broadcast against its per-sample [B]
    clipping coefficients; this loss averages each sample's outputs first.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_sample = ((output - target.view_as(output)) ** 2).reshape(len(output), -1).mean(1)
        if self.reduction == "none":
            return per_sample
        return per_sample.sum() if self.reduction == "sum" else per_sample.mean()


class Task(ABC):
    """A learning problem: what a site trains on, how episodes and evaluation are drawn,
    which model. Bundled tasks live beside this file; a plug-in subclasses this class in
    its own package (docs/plugins.md) and is named by an entry point in the group
    ``fedmeta.tasks`` or by ``package.module:Class``.

    To implement: ``name``, ``kind``, ``build_model``, ``site_records``,
    ``episode_pool`` and ``eval_episode``; the rest has defaults. The constructor
    receives those of ``n_way``, ``pool_per_class``, ``num_sites``, ``num_features``,
    ``num_classes``, ``data_dir``, ``image_size`` and ``channels`` it declares.
    """

    name: str
    kind: Kind
    #: how the run named the task and its model factory (set by the registry)
    spec: str = ""
    model_spec: str = ""
    #: default inner-loop and adaptation learning rates (SGD)
    default_inner_lr: float = 0.1
    default_adapt_lr: float = 0.1
    #: whether the server holds held-out data to evaluate theta on
    server_eval: bool = True

    def __init__(self, n_way: int = 5, pool_per_class: int = 40, num_sites: int = 10) -> None:
        self.n_way = n_way
        self.pool_per_class = pool_per_class
        self.num_sites = num_sites

    # --- models -----------------------------------------------------------
    @abstractmethod
    def build_model(self, out_dim: int) -> nn.Module:
        """The site model with ``out_dim`` outputs (last layer named ``head``)."""

    def meta_out_dim(self) -> int:
        """Output size of the meta-learned (Reptile) model."""
        return self.n_way if self.kind == "classification" else 1

    def supervised_out_dim(self) -> int:
        """Output size of the FedAvg baseline's model (fixed global labels)."""
        return self.meta_out_dim()

    def out_dim(self, strategy: str) -> int:
        meta = strategy in ("reptile", "fomaml")  # episodes with labels per episode
        return self.meta_out_dim() if meta else self.supervised_out_dim()

    def input_shape(self) -> tuple[int, ...]:
        """Shape of one record's features (e.g. ``(1, 8, 8)``): what a new site's data is
        resized to. Default: the shape of the first training site's records."""
        return tuple(int(d) for d in self.site_records(0).x.shape[1:])

    # --- data -------------------------------------------------------------
    @abstractmethod
    def site_records(self, site: int) -> Records:
        """The records held by training site ``site`` (0-based) of ``self.num_sites``."""

    @abstractmethod
    def episode_pool(self, records: Records, rng: np.random.Generator) -> Pool:
        """A round's Reptile training pool: one episode, labels re-assigned per episode.

        The pool is every record of the episode's groups (classes, functions),
        the groups drawn from the site's group labels alone: a record's
        presence must never change which *other* records enter the pool, or
        the Poisson accountant's add/remove relation no longer describes the
        round (docs/privacy-accounting.md). Sub-sampling is the DP trainer's.
        """

    def supervised_pool(self, records: Records) -> Pool:
        """The FedAvg baseline's pool: all records with their fixed global labels."""
        return Pool(records.x, records.y, records.units)

    @abstractmethod
    def eval_episode(
        self, split: Split, rng: np.random.Generator, shots: int, query: int
    ) -> Episode:
        """An evaluation episode from held-out classes / tasks / sites."""

    # --- judging ------------------------------------------------------------
    def loss_fn(self) -> nn.Module:
        return nn.CrossEntropyLoss() if self.kind == "classification" else SampleMSELoss()

    @property
    def metric_name(self) -> str:
        return "accuracy" if self.kind == "classification" else "mse"
