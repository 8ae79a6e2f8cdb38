"""PVT's transformer-block MLP: Linear -> GELU -> Linear, with dropout (timm's `Mlp`)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class Mlp(nn.Module):
    """fc2(drop(GELU(fc1(x)))), then dropout.

    grad_checkpointing: in training, keep only the input for backward and recompute fc1 and GELU there
    (`torch.utils.checkpoint`, which stops recomputing once the saved tensors are back), instead of keeping the two
    (N, hidden) activations; the same values either way.
    """

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0, grad_checkpointing: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)
        self.grad_checkpointing = grad_checkpointing

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._mlp, x, use_reentrant=False)
        return self._mlp(x)
