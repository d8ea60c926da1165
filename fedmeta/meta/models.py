"""The site models: small, BatchNorm-free (Opacus rejects BatchNorm)."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """conv 1-16-32 (3x3), 2x2 pool, 512-64-N for 8x8 images (digits)."""

    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(512, 64),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    """in-hidden...-out with ReLU; the last layer is ``head``."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], out_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_dim
        for width in hidden:
            layers += [nn.Linear(prev, width), nn.ReLU()]
            prev = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(prev, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def replace_head(model: nn.Module, out_dim: int) -> nn.Module:
    """Give ``model`` a fresh zero-initialised head of ``out_dim`` outputs (transfer learning)."""
    old = model.head
    assert isinstance(old, nn.Linear)
    if old.out_features != out_dim:
        model.head = nn.Linear(old.in_features, out_dim).to(old.weight.device)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    return model
