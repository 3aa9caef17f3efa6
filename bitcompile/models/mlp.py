"""A plain multi-layer perceptron."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """``Linear → GELU`` blocks and a final ``Linear``: ``MLP(64, [256, 256], 10)``."""

    def __init__(self, in_features: int, hidden: list[int], out_features: int) -> None:
        super().__init__()
        sizes = [in_features, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.out = nn.Linear(sizes[-1], out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = nn.functional.gelu(layer(x))
        return self.out(x)
