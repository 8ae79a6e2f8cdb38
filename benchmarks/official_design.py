"""The OFFICIAL PVT v1 + DETR design, re-implemented plainly from the papers' formulas: the benchmark's baseline
and the tests' independent reference.

What makes it "official" is the computation, not the code: PVT v1 (Wang et al., ICCV 2021) with stride-P
`nn.Conv2d` patch embedding and spatial reduction, explicit softmax attention that materialises every
(N, N_kv) map, NCHW <-> token permutes around every stage; DETR (Carion et al., ECCV 2020) with a 1x1-conv
`input_proj`, a sequence-first transformer on `nn.MultiheadAttention` (called as DETR does, with its default
`need_weights=True` and the padding mask always passed), and a matcher that builds the full batched cost
matrix (B*Q, T_all) before splitting it per image. Parameter names follow the official checkpoints
(`patch_embed1.proj`, `block1.0.attn.sr`, `pos_embed4` with a cls entry ...) and facebookresearch/detr's, so
`pvt_detr.load_pvt_checkpoint(ours.backbone, official.backbone.state_dict())` and
`pvt_detr.load_detr_checkpoint` give our model the same weights, and the tests check that both designs then compute
the same outputs, detections, losses and gradients.

Build with `build_official(config)`, the counterpart of `pvt_detr.build_model(config)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou

from pvt_detr.nested_tensor import NestedTensor, nested_tensor_from_tensor_list

# ----------------------------------------------------------------------------------------------------------- PVT v1


class DropPath(nn.Module):
    """Stochastic depth per sample: drops the residual branch with probability p, scales survivors by 1 / (1 - p)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - self.p)  # (B, 1, 1)
        return x * keep / (1 - self.p)


class Attention(nn.Module):
    """Spatial-reduction attention: softmax(q k^T * d^-1/2) v with k, v from a conv-reduced grid."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        B, N, C = x.shape
        h, d = self.num_heads, C // self.num_heads
        q = self.q(x).reshape(B, N, h, d).permute(0, 2, 1, 3)  # (B, h, N, d)
        if self.sr_ratio > 1:
            grid = x.permute(0, 2, 1).reshape(B, C, H, W)  # (B, C, H, W)
            x = self.norm(self.sr(grid).reshape(B, C, -1).permute(0, 2, 1))  # (B, N_kv, C)
        kv = self.kv(x).reshape(B, -1, 2, h, d).permute(2, 0, 3, 1, 4)  # (2, B, h, N_kv, d)
        attn = (q @ kv[0].transpose(-2, -1)) * self.scale  # (B, h, N, N_kv)
        attn = attn.softmax(dim=-1)
        out = (attn @ kv[1]).transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj(out)


class Block(nn.Module):
    """x + DropPath(Attention(LN(x))); x + DropPath(MLP(LN(x))), GELU MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential()
        self.mlp.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.mlp.act = nn.GELU()
        self.mlp.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Conv2d(k=P, s=P) + LayerNorm: (B, C_in, H, W) -> tokens (B, H/P * W/P, C_out)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)  # (B, C, h, w)
        H, W = x.shape[2:]
        return self.norm(x.flatten(2).transpose(1, 2)), H, W  # (B, h*w, C)


class OfficialPVT(nn.Module):
    """PVT v1 detection backbone: all four stage maps (B, C_i, H/s_i, W/s_i), s = 4, 8, 16, 32."""

    def __init__(self, depths=(3, 4, 6, 3), embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8),
                 mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1), drop_path_rate: float = 0.1):
        super().__init__()
        self.embed_dims = tuple(embed_dims)
        self.grids = (56, 28, 14, 7)  # 224 / stride
        patches, ins = (4, 2, 2, 2), (3, *embed_dims[:3])
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        k = 0
        for i in range(4):
            setattr(self, f"patch_embed{i + 1}", PatchEmbed(patches[i], ins[i], embed_dims[i]))
            extra = 1 if i == 3 else 0  # the classification cls token's entry, unused by the detector
            setattr(self, f"pos_embed{i + 1}", nn.Parameter(torch.zeros(1, self.grids[i] ** 2 + extra, embed_dims[i])))
            setattr(self, f"block{i + 1}", nn.ModuleList(Block(embed_dims[i], num_heads[i], mlp_ratios[i], sr_ratios[i],
                                                               rates[k + j]) for j in range(depths[i])))
            k += depths[i]
        # Present in the official ImageNet checkpoints; the detector never uses them.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[3]))
        self.norm = nn.LayerNorm(embed_dims[3], eps=1e-6)
        self.head = nn.Linear(embed_dims[3], 1000)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        for i in range(4):
            nn.init.trunc_normal_(getattr(self, f"pos_embed{i + 1}"), std=0.02)

    def _pos_embed(self, i: int, H: int, W: int) -> torch.Tensor:
        """Stage i positional embedding for an H x W grid: (1, H*W, C), bilinearly resized from 224's grid."""
        pos = getattr(self, f"pos_embed{i + 1}")
        if i == 3:
            pos = pos[:, 1:]
        g = self.grids[i]
        if (H, W) == (g, g):
            return pos
        pos = pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, C, g, g)
        pos = F.interpolate(pos, size=(H, W), mode="bilinear", align_corners=False)
        return pos.reshape(1, -1, H * W).permute(0, 2, 1)  # (1, H*W, C)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, 3, H, W) -> [(B, C_i, H/s_i, W/s_i)] for the four stages."""
        B = x.shape[0]
        outs = []
        for i in range(4):
            x, H, W = getattr(self, f"patch_embed{i + 1}")(x)  # (B, N, C)
            x = x + self._pos_embed(i, H, W)
            for blk in getattr(self, f"block{i + 1}"):
                x = blk(x, H, W)
            x = x.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)
            outs.append(x)
        return outs


# ----------------------------------------------------------------------------------------------------------- DETR


def sine_position_embedding(mask: torch.Tensor, num_pos_feats: int = 128, temperature: float = 10000.0) -> torch.Tensor:
    """mask (B, H, W) True on padding -> (B, 2F, H, W), normalised sine/cosine (y half, then x half)."""
    not_mask = (~mask).float()
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos_x = x[:, :, :, None] / dim_t  # (B, H, W, F)
    pos_y = y[:, :, :, None] / dim_t  # (B, H, W, F)
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)  # (B, H, W, F)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)  # (B, H, W, F)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # (B, 2F, H, W)


class EncoderLayer(nn.Module):
    """Post-norm: src = LN(src + MHA(src + pos, src + pos, src)); src = LN(src + FFN(src)); or pre-norm (the norms
    on the branch inputs). Sequence-first."""

    def __init__(self, d: int, nhead: int, dim_ff: int, dropout: float, pre_norm: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nhead, dropout=dropout)
        self.linear1, self.linear2 = nn.Linear(d, dim_ff), nn.Linear(dim_ff, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout, self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, src, mask, pos):
        """src, pos: (N, B, C); mask: (B, N) -> (N, B, C)."""
        if self.pre_norm:
            x = self.norm1(src)
            q = k = x + pos
            src = src + self.dropout1(self.self_attn(q, k, value=x, key_padding_mask=mask)[0])
            x = self.norm2(src)
            return src + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        q = k = src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(q, k, value=src, key_padding_mask=mask)[0]))
        return self.norm2(src + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(src))))))


class DecoderLayer(nn.Module):
    """Self-attention over queries, cross-attention to memory + pos, FFN; post-norm or pre-norm. Sequence-first."""

    def __init__(self, d: int, nhead: int, dim_ff: int, dropout: float, pre_norm: bool = False):
        super().__init__()
        self.pre_norm = pre_norm
        self.self_attn = nn.MultiheadAttention(d, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d, nhead, dropout=dropout)
        self.linear1, self.linear2 = nn.Linear(d, dim_ff), nn.Linear(dim_ff, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, tgt, memory, mask, pos, query_pos):
        """tgt, query_pos: (Q, B, C); memory, pos: (N, B, C); mask (B, N) -> (Q, B, C)."""
        if self.pre_norm:
            x = self.norm1(tgt)
            q = k = x + query_pos
            tgt = tgt + self.dropout1(self.self_attn(q, k, value=x)[0])
            x = self.norm2(tgt)
            tgt2 = self.multihead_attn(query=x + query_pos, key=memory + pos, value=memory, key_padding_mask=mask)[0]
            tgt = tgt + self.dropout2(tgt2)
            x = self.norm3(tgt)
            return tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, value=tgt)[0]))
        tgt2 = self.multihead_attn(query=tgt + query_pos, key=memory + pos, value=memory, key_padding_mask=mask)[0]
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        return self.norm3(tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))


class OfficialTransformer(nn.Module):
    """DETR's encoder-decoder, sequence-first; returns every decoder layer's normed output (L, B, Q, C)."""

    def __init__(self, d: int = 256, nhead: int = 8, enc: int = 6, dec: int = 6, dim_ff: int = 2048,
                 dropout: float = 0.1, pre_norm: bool = False):
        super().__init__()
        self.d_model = d
        # Containers named as in DETR's checkpoints: encoder.layers.*, encoder.norm (pre-norm), decoder.layers.*,
        # decoder.norm.
        self.encoder, self.decoder = nn.Module(), nn.Module()
        self.encoder.layers = nn.ModuleList(EncoderLayer(d, nhead, dim_ff, dropout, pre_norm) for _ in range(enc))
        self.encoder.norm = nn.LayerNorm(d) if pre_norm else None
        self.decoder.layers = nn.ModuleList(DecoderLayer(d, nhead, dim_ff, dropout, pre_norm) for _ in range(dec))
        self.decoder.norm = nn.LayerNorm(d)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src, mask, query_embed, pos):
        """src, pos: (B, C, H, W); mask: (B, H, W); query_embed: (Q, C) -> (L, B, Q, C)."""
        B = src.shape[0]
        src = src.flatten(2).permute(2, 0, 1)  # (N, B, C)
        pos = pos.flatten(2).permute(2, 0, 1)  # (N, B, C)
        query_pos = query_embed.unsqueeze(1).repeat(1, B, 1)  # (Q, B, C)
        mask = mask.flatten(1)  # (B, N)
        memory = src
        for layer in self.encoder.layers:
            memory = layer(memory, mask, pos)
        if self.encoder.norm is not None:
            memory = self.encoder.norm(memory)
        tgt = torch.zeros_like(query_pos)
        intermediate = []
        for layer in self.decoder.layers:
            tgt = layer(tgt, memory, mask, pos, query_pos)
            intermediate.append(self.decoder.norm(tgt))
        return torch.stack(intermediate).transpose(1, 2)  # (L, B, Q, C)


class OfficialDETR(nn.Module):
    """PVT v1 stage-4 map -> 1x1 conv input_proj -> transformer -> class / box heads (+ aux outputs)."""

    def __init__(self, backbone: OfficialPVT, transformer: OfficialTransformer, num_classes: int,
                 num_queries: int, aux_loss: bool = True):
        super().__init__()
        d = transformer.d_model
        self.backbone = backbone
        self.transformer = transformer
        self.aux_loss = aux_loss
        self.input_proj = nn.Conv2d(backbone.embed_dims[3], d, kernel_size=1)
        self.query_embed = nn.Embedding(num_queries, d)
        self.class_embed = nn.Linear(d, num_classes + 1)
        self.bbox_embed = nn.Module()  # DETR's 3-layer MLP box head
        self.bbox_embed.layers = nn.ModuleList([nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 4)])

    def forward(self, samples: NestedTensor | torch.Tensor | list[torch.Tensor]) -> dict:
        """Same inputs and outputs as `pvt_detr.DETR.forward`."""
        if isinstance(samples, (list, tuple)):
            samples = nested_tensor_from_tensor_list(samples)
        elif isinstance(samples, torch.Tensor):  # a batch of one size: nothing padded
            samples = NestedTensor(samples, torch.zeros(samples.shape[0], *samples.shape[2:], dtype=torch.bool,
                                                        device=samples.device))
        x = self.backbone(samples.tensors)[-1]  # (B, 512, H/32, W/32)
        mask = F.interpolate(samples.mask[None].float(), size=x.shape[-2:])[0].to(torch.bool)  # (B, h, w)
        pos = sine_position_embedding(mask, self.transformer.d_model // 2).to(x.dtype)  # (B, d, h, w)
        hs = self.transformer(self.input_proj(x), mask, self.query_embed.weight, pos)  # (L, B, Q, C)
        outputs_class = self.class_embed(hs)  # (L, B, Q, K+1)
        box = hs
        for i, layer in enumerate(self.bbox_embed.layers):
            box = F.relu(layer(box)) if i < 2 else layer(box)
        outputs_coord = box.sigmoid()  # (L, B, Q, 4)
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                  for a, b in zip(outputs_class[:-1], outputs_coord[:-1])]
        return out


class OfficialMatcher(nn.Module):
    """DETR's Hungarian matcher: one (B*Q, T_all) cost matrix over the whole batch, split per image on the CPU."""

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        B, Q = outputs["pred_logits"].shape[:2]
        out_prob = outputs["pred_logits"].flatten(0, 1).softmax(-1)  # (B*Q, K+1)
        out_bbox = outputs["pred_boxes"].flatten(0, 1)  # (B*Q, 4)
        tgt_ids = torch.cat([t["labels"] for t in targets])
        tgt_bbox = torch.cat([t["boxes"] for t in targets])
        cost = (self.cost_bbox * torch.cdist(out_bbox, tgt_bbox, p=1) - self.cost_class * out_prob[:, tgt_ids]
                - self.cost_giou * generalized_box_iou(box_convert(out_bbox, "cxcywh", "xyxy"),
                                                       box_convert(tgt_bbox, "cxcywh", "xyxy")))
        cost = cost.view(B, Q, -1).cpu()  # (B, Q, T_all)
        sizes = [len(t["boxes"]) for t in targets]
        indices = [linear_sum_assignment(c[i]) for i, c in enumerate(cost.split(sizes, -1))]
        return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in indices]


class OfficialCriterion(nn.Module):
    """DETR's SetCriterion: labels (CE, class error), cardinality, boxes (L1, GIoU), for every decoder layer."""

    def __init__(self, num_classes: int, matcher: OfficialMatcher, weight_dict: dict, eos_coef: float = 0.1):
        super().__init__()
        self.num_classes, self.matcher, self.weight_dict = num_classes, matcher, weight_dict
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def _losses(self, outputs: dict, targets: list[dict], indices, num_boxes: float, log: bool) -> dict:
        logits = outputs["pred_logits"]  # (B, Q, K+1)
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        target_classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[batch_idx, src_idx] = target_classes_o
        losses = {"loss_ce": F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)}
        with torch.no_grad():  # DETR logs the class error of the last layer only, the cardinality of every layer
            if log:
                correct = (logits[batch_idx, src_idx].argmax(-1) == target_classes_o).float()
                losses["class_error"] = 100 - 100 * (correct.mean() if len(correct) else correct.sum())
            n_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
            n_tgt = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
            losses["cardinality_error"] = F.l1_loss(n_pred.float(), n_tgt.float())
        src_boxes = outputs["pred_boxes"][batch_idx, src_idx]  # (M, 4)
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])  # (M, 4)
        losses["loss_bbox"] = F.l1_loss(src_boxes, tgt_boxes, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(box_convert(src_boxes, "cxcywh", "xyxy"),
                                              box_convert(tgt_boxes, "cxcywh", "xyxy")))
        losses["loss_giou"] = (1 - giou).sum() / num_boxes
        return losses

    def forward(self, outputs: dict, targets: list[dict], num_boxes: float | None = None) -> dict:
        if num_boxes is None:
            num_boxes = float(sum(len(t["labels"]) for t in targets))
        num_boxes = max(float(num_boxes), 1.0)
        main_outputs = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        losses = self._losses(main_outputs, targets, self.matcher(main_outputs, targets), num_boxes, log=True)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_losses = self._losses(aux, targets, self.matcher(aux, targets), num_boxes, log=False)
            losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        return losses


@torch.no_grad()
def official_postprocess(outputs: dict, target_sizes: torch.Tensor) -> list[dict]:
    """DETR's PostProcess: softmax, best non-background class per query, boxes in absolute xyxy of (h, w) sizes."""
    prob = F.softmax(outputs["pred_logits"], -1)  # (B, Q, K+1)
    scores, labels = prob[..., :-1].max(-1)  # (B, Q)
    boxes = box_convert(outputs["pred_boxes"], "cxcywh", "xyxy")  # (B, Q, 4)
    img_h, img_w = target_sizes.unbind(1)
    boxes = boxes * torch.stack([img_w, img_h, img_w, img_h], dim=1)[:, None, :]
    return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]


def build_official(config) -> tuple[OfficialDETR, OfficialCriterion]:
    """(model, criterion) of the official design from a `pvt_detr.ModelConfig` (or flags it reads): the registered
    PVT v1 sizes, backbone stage 4 only, plain DETR (no opt-in aids)."""
    from pvt_detr import ModelConfig, build_backbone

    cfg = ModelConfig.from_any(config)
    if list(cfg.backbone_stages) != [4] or cfg.anchor_queries or cfg.focal_loss or any(cfg.local_layers):
        raise ValueError("the official design exists for PVT v1 + plain DETR on backbone stage 4 only")
    ours = build_backbone(cfg.backbone)  # the variant's sizes, read off our registry
    heads = [blocks[0].attn.num_heads for blocks in ours.blocks]
    mlp_ratios = [blocks[0].mlp.fc1.out_features / dim for blocks, dim in zip(ours.blocks, ours.embed_dims)]
    num_classes = cfg.num_classes if cfg.num_classes is not None else 91
    backbone = OfficialPVT(depths=ours.depths, embed_dims=ours.embed_dims, num_heads=heads, mlp_ratios=mlp_ratios,
                           sr_ratios=cfg.sr_ratios, drop_path_rate=cfg.drop_path)
    transformer = OfficialTransformer(cfg.hidden_dim, cfg.nheads, cfg.enc_layers, cfg.dec_layers,
                                      cfg.dim_feedforward, cfg.dropout, cfg.pre_norm)
    model = OfficialDETR(backbone, transformer, num_classes, cfg.num_queries, aux_loss=cfg.aux_loss)
    weight_dict = {"loss_ce": cfg.cls_loss_coef, "loss_bbox": cfg.bbox_loss_coef, "loss_giou": cfg.giou_loss_coef}
    if cfg.aux_loss:
        base = dict(weight_dict)
        for i in range(cfg.dec_layers - 1):
            weight_dict.update({f"{k}_{i}": v for k, v in base.items()})
    matcher = OfficialMatcher(cfg.set_cost_class, cfg.set_cost_bbox, cfg.set_cost_giou)
    return model, OfficialCriterion(num_classes, matcher, weight_dict, eos_coef=cfg.eos_coef)
