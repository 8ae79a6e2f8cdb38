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


LEARNED_MAX_CELLS = 50  # DETR's row and column embedding count


class PositionEmbeddingLearned(nn.Module):
    """DETR's learned absolute encoding (`--position_embedding learned`): a row and a column embedding per cell.

    Cell (y, x) gets [col_embed[x], row_embed[y]] (DETR's order and parameter shapes, so its checkpoints load).
    Padding does not shift positions, so an image's encoding does not depend on its batch.
    """

    def __init__(self, num_pos_feats: int = 128, max_cells: int = LEARNED_MAX_CELLS):
        super().__init__()
        self.row_embed = nn.Embedding(max_cells, num_pos_feats)
        self.col_embed = nn.Embedding(max_cells, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask: (B, H, W) bool (only its shape is used) -> (B, H, W, 2 * num_pos_feats) encoding, (x, y) halves."""
        B, H, W = mask.shape
        cells = self.row_embed.num_embeddings
        if H > cells or W > cells:
            raise ValueError(f"the learned position embedding covers at most {cells} x {cells} feature cells, got "
                             f"{H} x {W}: use smaller images or --position_embedding sine")
        device = self.row_embed.weight.device
        x_emb = self.col_embed(torch.arange(W, device=device))  # (W, F)
        y_emb = self.row_embed(torch.arange(H, device=device))  # (H, F)
        pos = torch.cat([x_emb[None, :, :].expand(H, W, -1), y_emb[:, None, :].expand(H, W, -1)], dim=-1)  # (H, W, 2F)
        return pos[None].expand(B, H, W, -1)  # (B, H, W, 2F)
