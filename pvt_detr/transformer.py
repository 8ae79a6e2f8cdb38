"""DETR encoder-decoder transformer (Carion et al., ECCV 2020), batch-first.

Re-implemented from facebookresearch/detr `models/transformer.py` with the same parameter names (so DETR
checkpoints load): post-norm by default (`normalize_before=True` gives pre-norm), ReLU FFN, learned query
positions added at every decoder layer, decoder outputs of every layer passed through the final LayerNorm.

On the CPU without autograd (evaluation, inference) post-norm layers add their residuals in place: the attention
output projection accumulates into the residual (no bias-broadcast copy, no separate add) and the FFN runs as
`mlp_add_` (ReLU in place on a reused buffer). Same function either way. In training the dropouts draw their
masks with `pvt_detr.dropout` (cheaper on the CPU than `bernoulli_`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pvt_detr.attention import MultiheadAttention
from pvt_detr.backbone.mlp import can_fuse_inference, mlp_add_
from pvt_detr.dropout import Dropout
from pvt_detr.matmul import Linear, linear_add


def _residual_proj(residual: torch.Tensor, heads: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
    """residual + proj(heads) as one new tensor, without the bias-broadcast copy of a Linear: (B, N, C) x 2."""
    C = residual.shape[-1]
    out = linear_add(heads.reshape(-1, C), proj.weight, proj.bias, residual.reshape(-1, C))  # (B*N, C)
    return out.view(residual.shape)


class TransformerEncoderLayer(nn.Module):
    """Self-attention (q = k = src + pos, v = src) + FFN."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, normalize_before: bool):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = Linear(d_model, dim_feedforward)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.normalize_before = normalize_before

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def _fused(self, x: torch.Tensor) -> bool:
        return not (self.normalize_before or self.training) and can_fuse_inference(
            x, self.self_attn.out_proj, self.linear1, self.linear2)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """src, pos: (B, N, C); key_padding_mask: (B, N) True on padding -> (B, N, C)."""
        if self._fused(src):
            q = src + pos
            src = self.norm1(_residual_proj(src, self.self_attn.attend(q, q, src, key_padding_mask),
                                            self.self_attn.out_proj))  # (B, N, C), a new tensor: ours to update
            return self.norm2(mlp_add_(src, src, self.linear1, self.linear2, "relu"))
        if self.normalize_before:
            x = self.norm1(src)
            q = x + pos
            src = src + self.dropout1(self.self_attn(q, q, x, key_padding_mask))
            return src + self.dropout2(self._ffn(self.norm2(src)))
        q = src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(q, q, src, key_padding_mask)))
        return self.norm2(src + self.dropout2(self._ffn(src)))


class TransformerDecoderLayer(nn.Module):
    """Self-attention over queries, cross-attention to the encoder memory, FFN."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, normalize_before: bool):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = Linear(d_model, dim_feedforward)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.dropout3 = Dropout(dropout)
        self.normalize_before = normalize_before

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, memory_key: torch.Tensor,
                memory_key_padding_mask: torch.Tensor | None, query_pos: torch.Tensor) -> torch.Tensor:
        """tgt, query_pos: (B, Q, C); memory: (B, N, C); memory_key = memory + pos: (B, N, C) -> (B, Q, C)."""
        mask = memory_key_padding_mask
        if self.normalize_before:
            x = self.norm1(tgt)
            q = x + query_pos
            tgt = tgt + self.dropout1(self.self_attn(q, q, x))
            x = self.norm2(tgt)
            tgt = tgt + self.dropout2(self.multihead_attn(x + query_pos, memory_key, memory, mask))
            return tgt + self.dropout3(self._ffn(self.norm3(tgt)))
        q = tgt + query_pos
        if not self.training and can_fuse_inference(tgt, self.self_attn.out_proj, self.multihead_attn.out_proj,
                                                    self.linear1, self.linear2):
            tgt = self.norm1(_residual_proj(tgt, self.self_attn.attend(q, q, tgt), self.self_attn.out_proj))
            heads = self.multihead_attn.attend(tgt + query_pos, memory_key, memory, mask)  # (B, Q, C)
            tgt = self.norm2(_residual_proj(tgt, heads, self.multihead_attn.out_proj))  # a new tensor: ours
            return self.norm3(mlp_add_(tgt, tgt, self.linear1, self.linear2, "relu"))
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, q, tgt)))
        tgt2 = self.multihead_attn(tgt + query_pos, memory_key, memory, mask)
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        return self.norm3(tgt + self.dropout3(self._ffn(tgt)))


class TransformerEncoder(nn.Module):
    def __init__(self, layers: list[TransformerEncoderLayer], norm: nn.LayerNorm | None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm

    def forward(self, src: torch.Tensor, pos: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """src, pos: (B, N, C) -> memory (B, N, C)."""
        for layer in self.layers:
            src = layer(src, pos, key_padding_mask)
        return src if self.norm is None else self.norm(src)


class TransformerDecoder(nn.Module):
    def __init__(self, layers: list[TransformerDecoderLayer], norm: nn.LayerNorm):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor,
                memory_key_padding_mask: torch.Tensor | None, query_pos: torch.Tensor) -> torch.Tensor:
        """tgt, query_pos: (B, Q, C); memory, pos: (B, N, C) -> every layer's normed output (L, B, Q, C)."""
        memory_key = memory + pos  # (B, N, C), the same for every layer
        intermediate = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_key, memory_key_padding_mask, query_pos)
            intermediate.append(self.norm(tgt))
        return torch.stack(intermediate)  # (L, B, Q, C)


class Transformer(nn.Module):
    """DETR's encoder-decoder. Content queries start at zero; `query_embed` are their learned positions."""

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1, normalize_before: bool = False):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        args = (d_model, nhead, dim_feedforward, dropout, normalize_before)
        self.encoder = TransformerEncoder([TransformerEncoderLayer(*args) for _ in range(num_encoder_layers)],
                                          nn.LayerNorm(d_model) if normalize_before else None)
        self.decoder = TransformerDecoder([TransformerDecoderLayer(*args) for _ in range(num_decoder_layers)],
                                          nn.LayerNorm(d_model))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: torch.Tensor, mask: torch.Tensor | None, query_embed: torch.Tensor,
                pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src, pos: (B, N, C); mask: (B, N) True on padding; query_embed: (Q, C).

        Returns decoder outputs of every layer (L, B, Q, C) and the encoder memory (B, N, C).
        """
        B = src.shape[0]
        query_pos = query_embed.unsqueeze(0).expand(B, -1, -1)  # (B, Q, C)
        tgt = torch.zeros_like(query_pos)  # (B, Q, C)
        memory = self.encoder(src, pos, mask)  # (B, N, C)
        hs = self.decoder(tgt, memory, pos, mask, query_pos)  # (L, B, Q, C)
        return hs, memory
