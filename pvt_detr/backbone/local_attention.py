"""Neighbourhood self-attention over a k x k window, and the local-mixing layers PVT can run after a patch embedding.

PVT v1 embeds non-overlapping patches, so the tokens of one stage share no pixels ("local continuity is lost",
PVT v2 paper). PVT v2 restores it with overlapping convolutions; here it is restored with attention: every token
attends to its k x k neighbours with a learned relative-position bias per head. With k * k heads, each reading a
full-width value, and a bias that points head h at neighbour h (the locality initialisation of ConViT, d'Ascoli et
al. 2021; the construction of Cordonnier et al. 2020), the layer starts close to a k x k convolution. Queries and
keys can still change the weights per token. In the demo's short training they stay close to the initial pattern
(docs/demo.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class NeighbourhoodAttention(nn.Module):
    """Multi-head self-attention of each token over its k x k neighbourhood, with a relative-position bias.

    Keys outside the grid or on padding are never attended (a token always sees itself). Every head attends with
    `qk_dim`-wide queries and keys and reads a `dim`-wide value; the heads' outputs are concatenated and projected
    back to `dim`. `locality_strength` is head h's initial bias toward neighbour h (0: no locality prior).
    """

    def __init__(self, dim: int, kernel_size: int = 3, num_heads: int | None = None, qk_dim: int = 8,
                 locality_strength: float = 5.0):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
        self.kernel_size = kernel_size
        self.num_heads = num_heads or kernel_size * kernel_size
        self.qk_dim = qk_dim
        self.locality_strength = locality_strength
        self.qk = nn.Linear(dim, 2 * self.num_heads * qk_dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(self.num_heads * dim, dim)
        self.rel_bias = nn.Parameter(torch.zeros(self.num_heads, kernel_size * kernel_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default Linear init, and the locality bias (head h toward neighbour h mod k*k)."""
        for linear in (self.qk, self.v, self.proj):
            linear.reset_parameters()
        with torch.no_grad():
            self.rel_bias.zero_()
            heads = torch.arange(self.num_heads)
            self.rel_bias[heads, heads % self.rel_bias.shape[1]] = self.locality_strength

    def _windows(self, t: torch.Tensor) -> torch.Tensor:
        """(B, H, W, ...) -> (B, H, W, k*k, ...): each position's k x k neighbours (zero outside the grid)."""
        k, r = self.kernel_size, self.kernel_size // 2
        H, W = t.shape[1:3]
        pad = [0, 0] * (t.dim() - 3) + [r, r, r, r]
        padded = F.pad(t, pad)  # (B, H + 2r, W + 2r, ...)
        return torch.stack([padded[:, dy:dy + H, dx:dx + W] for dy in range(k) for dx in range(k)], dim=3)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, H, W, C) token grid; valid: (B, H, W) bool, True on tokens holding real pixels (None: all).

        Returns (B, H, W, C).
        """
        B, H, W, C = x.shape
        kk = self.kernel_size * self.kernel_size
        q, k = self.qk(x).view(B, H, W, 2, self.num_heads, self.qk_dim).unbind(3)  # (B, H, W, nh, d) each
        logits = torch.einsum("bhwnd,bhwknd->bhwnk", q, self._windows(k)) / math.sqrt(self.qk_dim)  # (B,H,W,nh,kk)
        if valid is None:
            valid = torch.ones(1, H, W, dtype=torch.bool, device=x.device)
        seen = self._windows(valid)  # (B or 1, H, W, kk)
        seen = seen | (torch.arange(kk, device=x.device) == kk // 2)  # a token always sees itself
        logits = (logits + self.rel_bias).masked_fill(~seen[:, :, :, None, :], float("-inf"))
        attn = logits.softmax(dim=-1)  # (B, H, W, nh, kk)
        values = self._windows(self.v(x))  # (B, H, W, kk, C)
        heads = torch.matmul(attn.view(-1, self.num_heads, kk), values.view(-1, kk, C))  # (B*H*W, nh, C)
        return self.proj(heads.view(B, H, W, self.num_heads * C))  # (B, H, W, C)


class LocalMixing(nn.Module):
    """Runs after a stage's patch embedding: GELU, then `depth` times neighbourhood attention -> LayerNorm -> GELU.

    Sequential, not residual: on the demo scenes a residual branch around the local layer is not recruited in the
    first epochs, while this order learns as fast as a convolutional stem (docs/demo.md).
    """

    def __init__(self, dim: int, depth: int, kernel_size: int = 3):
        super().__init__()
        self.attn = nn.ModuleList(NeighbourhoodAttention(dim, kernel_size) for _ in range(depth))
        self.norm = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))

    def reset_parameters(self) -> None:
        for attn, norm in zip(self.attn, self.norm):
            attn.reset_parameters()
            norm.reset_parameters()

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, H, W, C), valid: (B, H, W) bool or None -> (B, H, W, C)."""
        x = F.gelu(x)
        for attn, norm in zip(self.attn, self.norm):
            x = F.gelu(norm(attn(x, valid)))
        return x
