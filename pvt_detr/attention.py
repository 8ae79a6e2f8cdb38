"""Batch-first multi-head attention on `F.scaled_dot_product_attention`.

Parameter names and layout equal `torch.nn.MultiheadAttention` (`in_proj_weight` (3C, C) = [Wq; Wk; Wv],
`in_proj_bias`, `out_proj`), so facebookresearch/detr transformer weights load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint


class MultiheadAttention(nn.Module):
    """Multi-head attention, batch-first, with a key padding mask and attention dropout.

    grad_checkpointing: in training, keep only the inputs for backward and recompute the attention there
    (`torch.utils.checkpoint`, same dropout masks), instead of the (N_q, N_k) maps that attention with dropout keeps
    on the CPU; the same values either way.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, grad_checkpointing: bool = False):
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """query (B, N_q, C), key/value (B, N_k, C), key_padding_mask (B, N_k) True = ignore -> (B, N_q, C)."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._attention, query, key, value, key_padding_mask, use_reentrant=False)
        return self._attention(query, key, value, key_padding_mask)

    def _attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)  # (C, C) each
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)  # (C,) each
        q = rearrange(F.linear(query, w_q, b_q), "b n (h d) -> b h n d", h=self.num_heads)  # (B, nh, N_q, hd)
        k = rearrange(F.linear(key, w_k, b_k), "b n (h d) -> b h n d", h=self.num_heads)  # (B, nh, N_k, hd)
        v = rearrange(F.linear(value, w_v, b_v), "b n (h d) -> b h n d", h=self.num_heads)  # (B, nh, N_k, hd)
        attn_mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]  # (B, 1, 1, N_k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)  # (B, nh, N_q, hd)
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))  # (B, N_q, C)
