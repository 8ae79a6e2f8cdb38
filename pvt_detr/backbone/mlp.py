"""PVT's transformer-block MLP: Linear -> GELU -> Linear, with dropout (timm's `Mlp`)."""

from __future__ import annotations

import torch
from torch import nn


class Mlp(nn.Module):
    """fc2(drop(GELU(fc1(x)))), then dropout."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))  # (B, N, C)
