"""Batch-first multi-head attention on `F.scaled_dot_product_attention`.

Parameter names and layout equal `torch.nn.MultiheadAttention` (`in_proj_weight` (3C, C) = [Wq; Wk; Wv],
`in_proj_bias`, `out_proj`), so facebookresearch/detr transformer weights load unchanged. When query and key
are the same tensor (DETR's self-attention: q = k = x + pos) their projections run as one matmul.

Training with attention dropout on the CPU: SDPA's fused kernel has no dropout, so SDPA falls back to its math
path, which keeps three (B, nh, N_q, N_k) float maps for backward (probabilities, dropout noise, dropped
probabilities). `_DropoutAttention` computes the same formula but keeps only q, k, v and a bool keep-mask, and
recomputes the probabilities in backward, as fused attention kernels do. Its mask is drawn by
`pvt_detr.dropout.keep_mask` (about twice as fast as `bernoulli_`), and the NaN-safe softmax (a row with every
key masked gives zeros, as SDPA) is used only when some image has every key masked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from pvt_detr.dropout import keep_mask, mask_as
from pvt_detr.matmul import Linear, linear


class _DropoutAttention(torch.autograd.Function):
    """dropout(softmax(q k^T / sqrt(d) + bias)) v, as SDPA's math path; saves q, k, v, bias and a bool keep-mask.

    safe: some row of bias is -inf everywhere (use the softmax that gives zeros there, not NaN).
    """

    @staticmethod
    def _probs(q, k, bias, safe: bool):
        sf = q.shape[-1] ** -0.25  # SDPA's math path scales q and k by sqrt(scale) each
        qs, ks = q * sf, k * sf
        s = qs @ ks.transpose(-2, -1)  # (B, nh, N_q, N_k)
        if bias is not None:
            s += bias
        return (torch._safe_softmax(s, -1) if safe else torch.softmax(s, -1)), qs, ks, sf

    @staticmethod
    def forward(ctx, q, k, v, bias, p: float, safe: bool = True):
        attn, _, _, _ = _DropoutAttention._probs(q, k, bias, safe)  # (B, nh, N_q, N_k)
        keep = keep_mask(attn.shape, p, attn.device)  # (B, nh, N_q, N_k) bool
        ctx.p, ctx.safe = p, safe
        ctx.save_for_backward(q, k, v, bias, keep)
        return (attn.mul_(mask_as(keep, attn)) @ v).mul_(1 / (1 - p))  # (B, nh, N_q, d); rescaled after the matmul

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, bias, keep = ctx.saved_tensors
        attn, qs, ks, sf = _DropoutAttention._probs(q, k, bias, ctx.safe)  # recomputed, bit-identical to forward
        scale = 1 / (1 - ctx.p)  # applied to the (.., d) results, not to the maps; the backward is linear in it
        keep = mask_as(keep, attn)  # (B, nh, N_q, N_k) float 0/1
        dv = ((attn * keep).transpose(-2, -1) @ dout).mul_(scale)  # (B, nh, N_k, d)
        dattn = (dout @ v.transpose(-2, -1)).mul_(keep)  # (B, nh, N_q, N_k), d(probs) / scale
        ds = torch._softmax_backward_data(dattn, attn, -1, attn.dtype)  # (B, nh, N_q, N_k)
        del dattn, attn
        dq = (ds @ ks).mul_(sf * scale)  # (B, nh, N_q, d)
        dk = (ds.transpose(-2, -1) @ qs).mul_(sf * scale)  # (B, nh, N_k, d)
        return dq, dk, dv, None, None, None


class MultiheadAttention(nn.Module):
    """Multi-head attention, batch-first, with a key padding mask."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """query (B, N_q, C), key/value (B, N_k, C), key_padding_mask (B, N_k) True = ignore -> (B, N_q, C)."""
        return self.out_proj(self.attend(query, key, value, key_padding_mask))  # (B, N_q, C)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The heads' outputs before `out_proj`: same arguments as `forward` -> (B, N_q, C)."""
        C = self.embed_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        if query is key:
            q, k = linear(query, w[: 2 * C], b[: 2 * C]).split(C, dim=-1)  # (B, N_q, C) x 2
        else:
            q = linear(query, w[:C], b[:C])  # (B, N_q, C)
            k = linear(key, w[C : 2 * C], b[C : 2 * C])  # (B, N_k, C)
        v = linear(value, w[2 * C :], b[2 * C :])  # (B, N_k, C)
        q = rearrange(q, "b n (h d) -> b h n d", h=self.num_heads)  # (B, nh, N_q, hd)
        k = rearrange(k, "b n (h d) -> b h n d", h=self.num_heads)  # (B, nh, N_k, hd)
        v = rearrange(v, "b n (h d) -> b h n d", h=self.num_heads)  # (B, nh, N_k, hd)
        if self.training and self.dropout > 0 and q.device.type == "cpu" and torch.is_grad_enabled():
            bias, safe = None, False
            if key_padding_mask is not None:  # (B, 1, 1, N_k) additive, -inf = ignore
                bias = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
                bias = bias.masked_fill_(key_padding_mask, float("-inf"))[:, None, None, :]
                safe = bool(key_padding_mask.all(1).any())
            out = _DropoutAttention.apply(q, k, v, bias, self.dropout, safe)  # (B, nh, N_q, hd)
        else:
            attn_mask = None
            if key_padding_mask is not None:
                attn_mask = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, N_k), True = attend
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                 dropout_p=self.dropout if self.training else 0.0)  # (B, nh, N_q, hd)
        return rearrange(out, "b h n d -> b n (h d)")  # (B, N_q, C)
