"""PVT's patch embedding: non-overlapping P x P patches merged by a linear map (also SRA's reduction), no convolution.

The official PVT computes these with `nn.Conv2d(C_in, C_out, kernel_size=P, stride=P)`. Over non-overlapping
patches that convolution is exactly a Linear layer applied to each flattened patch; we flatten patches as
(p1, p2, c) so the input stays channels-last and the conv weight `[O, I, P, P]` maps to ours by
`w.permute(0, 2, 3, 1).reshape(O, P * P * I)` (see `conv_weight_to_linear`).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn


class PatchLinear(nn.Linear):
    """Maps every non-overlapping P x P patch of a channels-last grid to one `out_dim` vector.

    weight: (out_dim, P * P * in_dim), patches flattened as (p1, p2, c).
    """

    def __init__(self, in_dim: int, out_dim: int, patch_size: int):
        super().__init__(patch_size * patch_size * in_dim, out_dim)
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H // P, W // P, out_dim); trailing rows/columns that fill no patch are dropped."""
        p = self.patch_size
        if p == 1:
            return super().forward(x)
        h, w = x.shape[1] // p, x.shape[2] // p
        # Cut only when needed: under torch.export a no-op slice with symbolic sizes doubled the export time.
        if x.shape[1] != h * p or x.shape[2] != w * p:
            x = x[:, : h * p, : w * p]  # (B, h*P, w*P, C)
        x = rearrange(x, "b (h p1) (w p2) c -> b h w (p1 p2 c)", p1=p, p2=p)  # (B, h, w, P*P*C)
        return super().forward(x)  # (B, h, w, out_dim)


def conv_weight_to_linear(weight: torch.Tensor) -> torch.Tensor:
    """Official stride-P conv weight (O, I, P, P) -> PatchLinear weight (O, P*P*I)."""
    out_dim = weight.shape[0]
    return weight.permute(0, 2, 3, 1).reshape(out_dim, -1)  # (O, P*P*I)


def linear_weight_to_conv(weight: torch.Tensor, in_dim: int, patch_size: int) -> torch.Tensor:
    """Inverse of `conv_weight_to_linear`: (O, P*P*I) -> (O, I, P, P)."""
    out_dim = weight.shape[0]
    return weight.reshape(out_dim, patch_size, patch_size, in_dim).permute(0, 3, 1, 2)  # (O, I, P, P)


class PatchEmbed(nn.Module):
    """Non-overlapping P x P patches -> linear -> LayerNorm (official: Conv2d(k=P, s=P) + LayerNorm)."""

    def __init__(self, in_dim: int, out_dim: int, patch_size: int, norm_eps: float = 1e-5):
        super().__init__()
        self.proj = PatchLinear(in_dim, out_dim, patch_size)
        self.norm = nn.LayerNorm(out_dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C_in) -> (B, H // P, W // P, C_out)."""
        return self.norm(self.proj(x))
