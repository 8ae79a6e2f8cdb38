"""DETR encoder-decoder transformer (Carion et al., ECCV 2020), batch-first.

Re-implemented from facebookresearch/detr `models/transformer.py` with the same parameter names (so DETR
checkpoints load): post-norm by default (`normalize_before=True` gives pre-norm), ReLU FFN, learned query
positions added at every decoder layer, decoder outputs of every layer passed through the final LayerNorm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pvt_detr.attention import MultiheadAttention


class TransformerEncoderLayer(nn.Module):
    """Self-attention (q = k = src + pos, v = src) + FFN. grad_checkpointing: the self-attention recomputes its
    (N, N) maps in backward instead of keeping them (see MultiheadAttention)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, normalize_before: bool,
                 grad_checkpointing: bool = False):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, grad_checkpointing=grad_checkpointing)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(self, src: torch.Tensor, pos: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """src, pos: (B, N, C); key_padding_mask: (B, N) True on padding -> (B, N, C)."""
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
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
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
                 dim_feedforward: int = 2048, dropout: float = 0.1, normalize_before: bool = False,
                 grad_checkpointing: bool = False):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        args = (d_model, nhead, dim_feedforward, dropout, normalize_before)
        self.encoder = TransformerEncoder([TransformerEncoderLayer(*args, grad_checkpointing=grad_checkpointing)
                                           for _ in range(num_encoder_layers)],
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
