"""DETR's sine position encoding computed from the padding mask (facebookresearch/detr `PositionEmbeddingSine`)."""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Attention-is-all-you-need sine/cosine encoding generalised to images, normalised over the unpadded area."""

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
                 scale: float = 2 * math.pi, eps: float = 1e-6):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.eps = eps

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask: (B, H, W) bool, True on padding -> (B, H, W, 2 * num_pos_feats) encoding, (y, x) halves."""
        not_mask = (~mask).to(torch.float32)  # (B, H, W)
        y_embed = not_mask.cumsum(1)  # (B, H, W)
        x_embed = not_mask.cumsum(2)  # (B, H, W)
        if self.normalize:
            y_embed = y_embed / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + self.eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)  # (F,)
        pos_x = x_embed[..., None] / dim_t  # (B, H, W, F)
        pos_y = y_embed[..., None] / dim_t  # (B, H, W, F)
        # Interleave sin (even features) and cos (odd features), as DETR does.
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)  # (B, H, W, F)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)  # (B, H, W, F)
        return torch.cat((pos_y, pos_x), dim=3)  # (B, H, W, 2F)
