"""Spatial-reduction attention (SRA), PVT v1 (Wang et al., ICCV 2021), without convolutions.

Keys and values come from the token grid reduced by a non-overlapping R x R linear map + LayerNorm
(the official stride-R conv); R = 1 is plain multi-head self-attention. Attention is computed by
`F.scaled_dot_product_attention`, which never keeps the (N, N_kv) map on its fused kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from pvt_detr.backbone.patch_embed import PatchLinear


class SpatialReductionAttention(nn.Module):
    """Multi-head attention whose keys/values are read from an R-times reduced grid."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)  # rows [:dim] = K, [dim:] = V (official layout)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = PatchLinear(dim, dim, sr_ratio)
            self.norm = nn.LayerNorm(dim)  # official: default eps 1e-5 here (blocks use 1e-6)

    def forward(self, x: torch.Tensor, hw: tuple[int, int], kv_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, C) tokens of an H x W grid (N = H * W when R > 1; R = 1 also takes extra tokens, e.g. cls).

        kv_mask: (B, N_kv) bool, True = key may be attended (None = all). Returns (B, N, C).
        """
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.num_heads)  # (B, nh, N, hd)
        if self.sr_ratio > 1:
            grid = x.view(x.shape[0], hw[0], hw[1], x.shape[2])  # (B, H, W, C)
            x = self.norm(self.sr(grid)).flatten(1, 2)  # (B, N_kv, C)
        k, v = rearrange(self.kv(x), "b n (t h d) -> t b h n d", t=2, h=self.num_heads)  # (B, nh, N_kv, hd) x 2
        attn_mask = None if kv_mask is None else kv_mask[:, None, None, :]  # (B, 1, 1, N_kv)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.attn_drop if self.training else 0.0)  # (B, nh, N, hd)
        return self.proj_drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))  # (B, N, C)
