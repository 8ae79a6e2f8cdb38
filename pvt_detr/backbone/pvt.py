"""Pyramid Vision Transformer v1 (Wang et al., ICCV 2021), convolution-free.

Re-implemented from the paper and the official `pvt.py` (whai362/PVT, v1): four stages of patch embedding
+ transformer blocks with spatial-reduction attention, strides 4/8/16/32. Patch embedding and spatial
reduction are linear maps over non-overlapping patches (`PatchLinear`), the same function as the official
stride-P convolutions. Positional embeddings are stored for 224 x 224 and interpolated per stage, each stage
compared with its own grid (the official helper compares every stage with stage 1's 3136 tokens).

As a detection backbone (`num_classes=0`) it returns raw stage maps like timm's `features_only`; with a padding
mask (NestedTensor path) padded keys are never attended and positional embeddings are fitted to each image's
own extent, so an image's features do not depend on what it was batched with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import StochasticDepth

from pvt_detr.backbone.local_attention import LocalMixing
from pvt_detr.backbone.mlp import Mlp
from pvt_detr.backbone.patch_embed import PatchEmbed
from pvt_detr.backbone.sra import SpatialReductionAttention
from pvt_detr.nested_tensor import NestedTensor, valid_sizes


def _bilinear_taps(out_len: torch.Tensor, size: int, in_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear resampling of a length-`in_len` axis to `out_len[b]` points, as `F.interpolate(align_corners=False)`.

    out_len: (B,) target lengths. For output indices 0..size-1 returns (i0, i1, w1), each (B, size): output i reads
    (1 - w1) * input[i0] + w1 * input[i1]. Source point (i + 0.5) * in_len / out_len - 0.5, clamped to the input;
    indices past out_len[b] are clamped too (callers zero them).
    """
    scale = torch.full_like(out_len, in_len, dtype=torch.float32) / out_len  # (B,) as interpolate: in / out
    src = ((torch.arange(size, device=out_len.device) + 0.5) * scale[:, None] - 0.5).clamp(min=0)  # (B, size)
    i0 = src.long()  # (B, size), floor as src >= 0
    w1 = (src - i0).clamp(0, 1)  # (B, size)
    return i0.clamp(max=in_len - 1), (i0 + 1).clamp(max=in_len - 1), w1


def resize_pos_embed(pos: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Positional embedding of a square g x g grid (1, g * g, C) resized bilinearly to h x w: (1, h, w, C)."""
    g = math.isqrt(pos.shape[1])
    pos = pos.view(1, g, g, -1)  # (1, g, g, C)
    if tuple(hw) == (g, g):
        return pos
    pos = F.interpolate(pos.permute(0, 3, 1, 2), size=tuple(hw), mode="bilinear", align_corners=False)
    return pos.permute(0, 2, 3, 1)  # (1, h, w, C)


def _valid_grid(valid_hw: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, 2) [h, w] valid token counts -> (B, H, W) bool, True on tokens holding real pixels."""
    rows = torch.arange(hw[0], device=valid_hw.device)[None, :, None] < valid_hw[:, 0, None, None]  # (B, H, 1)
    cols = torch.arange(hw[1], device=valid_hw.device)[None, None, :] < valid_hw[:, 1, None, None]  # (B, 1, W)
    return rows & cols  # (B, H, W)


class Block(nn.Module):
    """Pre-norm transformer block: x + drop_path(SRA(norm1(x))), then x + drop_path(MLP(norm2(x))).

    grad_checkpointing: in training, keep only the block's input for backward and recompute the block there
    (`torch.utils.checkpoint`, same dropout and drop-path draws), instead of keeping every activation inside it;
    the same values either way.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-6,
                 grad_checkpointing: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = SpatialReductionAttention(dim, num_heads, sr_ratio, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                              proj_drop=drop)
        self.drop_path = StochasticDepth(drop_path, mode="row") if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.grad_checkpointing = grad_checkpointing

    def _block(self, x: torch.Tensor, hw: tuple[int, int], kv_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw, kv_mask))  # (B, N, C)
        return x + self.drop_path(self.mlp(self.norm2(x)))  # (B, N, C)

    def forward(self, x: torch.Tensor, hw: tuple[int, int], kv_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, C) tokens of an H x W grid; kv_mask: (B, N_kv) bool, True = key may be attended -> (B, N, C)."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._block, x, hw, kv_mask, use_reentrant=False)
        return self._block(x, hw, kv_mask)


class PyramidVisionTransformer(nn.Module):
    """PVT v1. `num_classes=0` gives the detection backbone (stage maps); `num_classes>0` the ImageNet classifier."""

    def __init__(self, *, embed_dims: Sequence[int] = (64, 128, 320, 512), num_heads: Sequence[int] = (1, 2, 5, 8),
                 mlp_ratios: Sequence[float] = (8, 8, 4, 4), depths: Sequence[int] = (3, 4, 6, 3),
                 sr_ratios: Sequence[int] = (8, 4, 2, 1), patch_sizes: Sequence[int] = (4, 2, 2, 2),
                 in_chans: int = 3, qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, pretrain_img_size: int = 224, num_classes: int = 0,
                 out_indices: Sequence[int] = (0, 1, 2, 3), local_layers: Sequence[int] = (0, 0, 0, 0),
                 grad_checkpointing: bool = False):
        super().__init__()
        if not all(len(v) == 4 for v in (embed_dims, num_heads, mlp_ratios, depths, sr_ratios, patch_sizes,
                                         local_layers)):
            raise ValueError("PVT takes exactly four values per stage for dims, heads, mlp ratios, depths, sr, patch, "
                             "local layers")
        if any(n < 0 for n in local_layers):
            raise ValueError(f"local_layers must be >= 0 per stage, got {tuple(local_layers)}")
        if not out_indices or any(i not in range(4) for i in out_indices):
            raise ValueError(f"out_indices must be a non-empty subset of 0..3, got {tuple(out_indices)}")
        self.num_classes = num_classes
        self.depths = tuple(depths)
        self.patch_sizes = tuple(patch_sizes)
        self.out_indices = tuple(sorted(out_indices))
        self.embed_dims = tuple(embed_dims)
        self.strides = [math.prod(patch_sizes[: i + 1]) for i in range(4)]
        self.pretrain_grids = [pretrain_img_size // s for s in self.strides]

        dims_in = (in_chans, *embed_dims[:3])
        # Official: the patch-embedding LayerNorm uses the torch default eps (1e-5); blocks use 1e-6.
        self.patch_embed = nn.ModuleList(PatchEmbed(dims_in[i], embed_dims[i], patch_sizes[i]) for i in range(4))
        self.pos_embed = nn.ParameterList(
            nn.Parameter(torch.zeros(1, g * g, d)) for g, d in zip(self.pretrain_grids, embed_dims))
        # Not in PVT v1 (0 = off, the paper's model): neighbourhood-attention layers after each patch embedding.
        self.local_layers = tuple(local_layers)
        self.local = nn.ModuleList(LocalMixing(d, n) if n else nn.Identity() for d, n in zip(embed_dims, local_layers))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        starts = [sum(depths[:i]) for i in range(4)]
        self.blocks = nn.ModuleList(
            nn.ModuleList(
                Block(embed_dims[i], num_heads[i], mlp_ratios[i], sr_ratios[i], qkv_bias=qkv_bias, drop=drop_rate,
                      attn_drop=attn_drop_rate, drop_path=rates[starts[i] + j], grad_checkpointing=grad_checkpointing)
                for j in range(depths[i]))
            for i in range(4))
        if num_classes > 0:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[3]))
            self.cls_pos_embed = nn.Parameter(torch.zeros(1, 1, embed_dims[3]))
            self.norm = nn.LayerNorm(embed_dims[3], eps=1e-6)
            self.head = nn.Linear(embed_dims[3], num_classes)
        self._init_weights()
        if num_classes == 0:  # stages after the last returned one never run: kept for checkpoints, frozen
            for i in range(max(self.out_indices) + 1, 4):
                for part in (self.patch_embed[i], self.local[i], self.blocks[i]):
                    part.requires_grad_(False)
                self.pos_embed[i].requires_grad_(False)

    @property
    def num_channels(self) -> list[int]:
        """Channels of each returned stage map."""
        return [self.embed_dims[i] for i in self.out_indices]

    @property
    def feature_strides(self) -> list[int]:
        """Stride (reduction) of each returned stage map."""
        return [self.strides[i] for i in self.out_indices]

    @property
    def feature_info(self) -> list[dict]:
        """timm-style description of the returned maps."""
        return [{"num_chs": self.embed_dims[i], "reduction": self.strides[i], "module": f"blocks.{i}"}
                for i in self.out_indices]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch: the blocks recompute their activations in backward (see `Block`)."""
        for stage in self.blocks:
            for blk in stage:
                blk.grad_checkpointing = enable

    def _init_weights(self) -> None:
        for p in self.pos_embed:
            nn.init.trunc_normal_(p, std=0.02)
        if self.num_classes > 0:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            nn.init.trunc_normal_(self.cls_pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.local:
            if isinstance(m, LocalMixing):
                m.reset_parameters()  # its own init (PyTorch's default Linear init and the locality bias)

    def _pos_embed(self, stage: int, hw: tuple[int, int]) -> torch.Tensor:
        """Stage positional embedding resized to an h x w grid: (1, h, w, C)."""
        return resize_pos_embed(self.pos_embed[stage], hw)

    def _pos_embed_per_image(self, stage: int, valid_hw: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Stage positional embedding resized to each image's valid h_b x w_b tokens, zero on padding: (B, H, W, C).

        The whole batch at once with tensor ops only (exportable): rows then columns are interpolated at the
        points and with the weights of `F.interpolate(mode="bilinear", align_corners=False)` (`_bilinear_taps`),
        so every image gets what `_pos_embed(stage, (h_b, w_b))` gives it. Padding rows/columns read an appended
        zero row/column.
        """
        g = self.pretrain_grids[stage]
        H, W = hw
        pos = self.pos_embed[stage].view(g, g, -1)  # (g, g, C)
        C = pos.shape[-1]
        valid_hw = valid_hw.to(pos.device)  # (B, 2)
        B = valid_hw.shape[0]
        y0, y1, wy = _bilinear_taps(valid_hw[:, 0], H, g)  # (B, H) each
        x0, x1, wx = _bilinear_taps(valid_hw[:, 1], W, g)  # (B, W) each
        pad_rows = torch.arange(H, device=pos.device)[None, :] >= valid_hw[:, :1]  # (B, H)
        pad_cols = torch.arange(W, device=pos.device)[None, :] >= valid_hw[:, 1:]  # (B, W)
        pos = torch.cat([pos, pos.new_zeros(1, g, C)])  # (g + 1, g, C), row g = 0
        y0, y1 = y0.masked_fill(pad_rows, g).flatten(), y1.masked_fill(pad_rows, g).flatten()  # (B*H,)
        rows = torch.lerp(pos.index_select(0, y0), pos.index_select(0, y1), wy.reshape(-1, 1, 1))  # (B*H, g, C)
        rows = torch.cat([rows, rows.new_zeros(B * H, 1, C)], 1).flatten(0, 1)  # (B*H*(g+1), C), column g = 0
        first = torch.arange(B * H, device=pos.device).view(B, H, 1) * (g + 1)  # (B, H, 1) row starts
        x0, x1 = x0.masked_fill(pad_cols, g)[:, None, :], x1.masked_fill(pad_cols, g)[:, None, :]  # (B, 1, W)
        out = torch.lerp(rows.index_select(0, (first + x0).flatten()), rows.index_select(0, (first + x1).flatten()),
                         wx[:, None, :].expand(B, H, W).reshape(-1, 1))  # (B*H*W, C)
        return out.view(B, H, W, C)

    def _add_pos_embed(self, stage: int, x: torch.Tensor, valid_hw: torch.Tensor | None) -> torch.Tensor:
        """Adds the positional embedding to grid x (B, H, W, C), fitted to each image's valid extent (valid_hw
        (B, 2) [h, w] tokens), or to the whole grid when valid_hw is None."""
        if valid_hw is None:
            return x + self._pos_embed(stage, tuple(x.shape[1:3]))
        return x + self._pos_embed_per_image(stage, valid_hw, tuple(x.shape[1:3])).to(x.dtype)

    def _stages(self, x: torch.Tensor, valid_hw: torch.Tensor | None = None):
        """Runs the four stages; yields (stage index, grid (B, H, W, C), valid (B, 2) [h, w] token counts or None).

        x: (B, C_in, H, W) images; valid_hw: (B, 2) unpadded pixel sizes, or None when nothing is padded.
        """
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C_in), a view
        for i in range(4):
            if self.num_classes == 0 and i > max(self.out_indices):
                return
            p = self.patch_sizes[i]
            x = self.patch_embed[i](x)  # (B, H_i, W_i, C_i)
            B, H, W, C = x.shape
            if valid_hw is not None:
                valid_hw = torch.div(valid_hw + p - 1, p, rounding_mode="floor")  # (B, 2) tokens with real pixels
                valid_hw = torch.stack((valid_hw[:, 0].clamp(max=H), valid_hw[:, 1].clamp(max=W)), dim=1)  # (B, 2)
            if self.local_layers[i]:
                x = self.local[i](x, None if valid_hw is None else _valid_grid(valid_hw, (H, W)))  # (B, H, W, C)
            x = self.pos_drop(self._add_pos_embed(i, x, valid_hw))
            tokens = x.reshape(B, H * W, C)  # (B, N, C)
            if i == 3 and self.num_classes > 0:
                cls = (self.cls_token + self.cls_pos_embed).expand(B, -1, -1)  # (B, 1, C)
                tokens = torch.cat([cls, tokens], dim=1)  # (B, 1 + N, C)
            kv_mask = self._kv_mask(i, (H, W), valid_hw)
            for blk in self.blocks[i]:
                tokens = blk(tokens, (H, W), kv_mask)  # (B, N, C)
            if i == 3 and self.num_classes > 0:
                yield i, tokens, valid_hw
                return
            x = tokens.view(B, H, W, C)  # (B, H_i, W_i, C_i)
            yield i, x, valid_hw

    def _kv_mask(self, stage: int, hw: tuple[int, int], valid_hw: torch.Tensor | None) -> torch.Tensor | None:
        """(B, N_kv) bool, True where a reduced key cell holds at least one real pixel; None without valid_hw."""
        if valid_hw is None:
            return None
        r = self.blocks[stage][0].attn.sr_ratio
        h, w = hw[0] // r, hw[1] // r
        valid = torch.div(valid_hw + r - 1, r, rounding_mode="floor")  # (B, 2)
        return _valid_grid(valid, (h, w)).flatten(1)  # (B, h * w)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, 3, H, W) -> raw stage maps [(B, C_i, H / s_i, W / s_i) for i in out_indices], s = 4, 8, 16, 32."""
        if self.num_classes > 0:
            raise RuntimeError("forward_features is for the detection backbone (num_classes=0)")
        return [grid.permute(0, 3, 1, 2) for i, grid, _ in self._stages(x) if i in self.out_indices]

    def forward_nested(self, samples: NestedTensor) -> list[NestedTensor]:
        """Padded batch -> per selected stage a NestedTensor of (B, C_i, H_i, W_i) maps and (B, H_i, W_i) masks.

        Masks are True on tokens that hold no real pixel.
        """
        images, mask = samples.decompose()
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.bool, device=images.device)
        out = []
        for i, grid, valid_hw in self._stages(images, valid_sizes(mask)):  # valid_sizes: (B, 2) unpadded pixels
            if i in self.out_indices:
                stage_mask = ~_valid_grid(valid_hw, tuple(grid.shape[1:3]))  # (B, H_i, W_i)
                out.append(NestedTensor(grid.permute(0, 3, 1, 2), stage_mask))  # (B, C_i, H_i, W_i)
        return out

    def forward(self, x: torch.Tensor | NestedTensor):
        """Classifier: (B, 3, H, W) -> (B, num_classes) logits. Backbone: see forward_features / forward_nested."""
        if isinstance(x, NestedTensor):
            return self.forward_nested(x)
        if self.num_classes == 0:
            return self.forward_features(x)
        *_, (_, tokens, _) = self._stages(x)
        return self.head(self.norm(tokens)[:, 0])  # (B, num_classes)
