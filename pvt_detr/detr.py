"""DETR on a PVT backbone (Carion et al. 2020; the PVT paper's "PVT + DETR" detector) and `build_model`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pvt_detr.backbone.registry import build_backbone
from pvt_detr.config import ModelConfig
from pvt_detr.criterion import build_criterion
from pvt_detr.nested_tensor import NestedTensor, nested_tensor_from_tensor_list
from pvt_detr.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine
from pvt_detr.postprocess import PostProcess, SigmoidPostProcess
from pvt_detr.transformer import Transformer

COCO_NUM_CLASSES = 91  # max COCO category id (90) + 1


class MLP(nn.Module):
    """Plain multi-layer perceptron with ReLU between layers (DETR's box head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., input_dim) -> (..., output_dim)."""
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """logit(x) with x clamped to [eps, 1 - eps]."""
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


def box_sine_embed(boxes: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's sine encoding of each of the 4 box coordinates in [0, 1]: (..., 4) -> (..., 4 * num_feats)."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)  # (F,)
    pos = boxes[..., None] * (2 * math.pi) / dim_t  # (..., 4, F)
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)  # (..., 4, F)
    return pos.flatten(-2)  # (..., 4F)


class DETR(nn.Module):
    """Backbone stage maps -> linear input projection -> transformer -> class and box heads.

    `position_embedding`: the encoder tokens' positions, DETR's "sine" (normalised to each image's unpadded extent)
    or "learned" (a row and a column embedding per cell, at most 50 x 50 cells).

    Opt-in convergence aids (defaults give plain DETR):
    - `anchor_queries`: each query owns a learned reference box (DAB-DETR style, Liu et al. 2022); its sine
      encoding through a small MLP is the query position, and the box head predicts an offset to it in logit
      space (last box layer initialised to zero, so training starts from boxes spread over the image).
    - `focal`: the class head has `num_classes` sigmoid outputs (no no-object class) with the focal-loss prior
      bias (Deformable DETR); use with `SigmoidFocalSetCriterion` and `SigmoidPostProcess`.
    - `two_stage` (needs `anchor_queries`): Deformable DETR's two-stage scheme: every encoder token predicts a
      class and a box (an offset to a box of `anchor_size` centred on the token), trained with the set loss
      (Hungarian matching over the tokens, `enc_outputs`); the `num_queries` best-scoring token boxes (detached)
      are the decoder's reference boxes instead of learned ones, their features its content queries.
    """

    def __init__(self, backbone: nn.Module, transformer: Transformer, num_classes: int, num_queries: int,
                 aux_loss: bool = True, anchor_queries: bool = False, focal: bool = False, anchor_size: float = 0.25,
                 two_stage: bool = False, position_embedding: str = "sine"):
        super().__init__()
        if position_embedding not in ("sine", "learned"):
            raise ValueError(f"position_embedding must be 'sine' or 'learned', got {position_embedding!r}")
        if two_stage and not anchor_queries:
            raise ValueError("two_stage needs anchor_queries")
        d = transformer.d_model
        self.backbone = backbone
        self.transformer = transformer
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        if position_embedding == "sine":
            self.position_embedding = PositionEmbeddingSine(d // 2, normalize=True)
        else:
            self.position_embedding = PositionEmbeddingLearned(d // 2)
        # One projection per backbone stage used (DETR: a 1x1 conv; here the equal Linear on channels-last maps).
        self.input_proj = nn.ModuleList(nn.Linear(c, d) for c in backbone.num_channels)
        # Several stages: their tokens are concatenated and told apart by a learned level embedding.
        self.level_embed = nn.Parameter(torch.zeros(len(backbone.num_channels), d)) \
            if len(backbone.num_channels) > 1 else None
        self.anchor_queries = anchor_queries
        self.focal = focal
        self.two_stage, self.anchor_size = two_stage, anchor_size
        num_logits = num_classes if focal else num_classes + 1
        if two_stage:  # per-token class and box heads on the (normed, projected) encoder memory
            self.enc_output = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d))
            self.enc_class_embed = nn.Linear(d, num_logits)
            self.enc_bbox_embed = MLP(d, d, 4, 3)
            nn.init.zeros_(self.enc_bbox_embed.layers[-1].weight)
            nn.init.zeros_(self.enc_bbox_embed.layers[-1].bias)
            if focal:
                nn.init.constant_(self.enc_class_embed.bias, -math.log((1 - 0.01) / 0.01))
        if anchor_queries:
            if not two_stage:
                self.refpoint_embed = nn.Embedding(num_queries, 4)  # reference boxes (cx, cy, w, h), logit space
            self.ref_point_head = MLP(2 * d, d, d, 2)  # sine(box) (4 * d/2) -> query position
        else:
            self.query_embed = nn.Embedding(num_queries, d)
        self.class_embed = nn.Linear(d, num_logits)
        self.bbox_embed = MLP(d, d, 4, 3)
        if self.level_embed is not None:
            nn.init.normal_(self.level_embed)
        if focal:  # prior probability 0.01 for every class (RetinaNet / Deformable DETR)
            nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))
        if anchor_queries and not two_stage:
            with torch.no_grad():
                g = torch.Generator().manual_seed(0)
                centres = torch.rand(num_queries, 2, generator=g)  # (Q, 2) uniform over the image
                sizes = torch.full((num_queries, 2), anchor_size)
                self.refpoint_embed.weight.copy_(inverse_sigmoid(torch.cat([centres, sizes], 1)))
        if anchor_queries:
            nn.init.zeros_(self.bbox_embed.layers[-1].weight)
            nn.init.zeros_(self.bbox_embed.layers[-1].bias)

    def forward(self, samples: NestedTensor | torch.Tensor | list[torch.Tensor]) -> dict:
        """samples: NestedTensor (B, 3, H, W) + mask (B, H, W), a (B, 3, H, W) tensor, or a list of (3, H_i, W_i).

        Returns pred_logits (B, Q, K+1) (last index = no object; (B, Q, K) sigmoid logits with `focal`), pred_boxes
        (B, Q, 4) cxcywh normalised to [0, 1] by each image's unpadded size, both float32, aux_outputs (one such dict
        per earlier decoder layer) if aux_loss, and with two_stage enc_outputs (the encoder tokens' predictions).
        """
        if isinstance(samples, (list, tuple)):
            samples = nested_tensor_from_tensor_list(samples)
        elif isinstance(samples, torch.Tensor):
            samples = NestedTensor(samples, None)
        srcs, masks, poss, token_boxes = [], [], [], []
        for level, feature in enumerate(self.backbone.forward_nested(samples)):
            x, mask = feature.decompose()  # (B, C, H, W), (B, H, W)
            if self.two_stage:
                token_boxes.append(self._token_boxes(mask, level))  # (B, H*W, 4)
            src = self.input_proj[level](x.permute(0, 2, 3, 1)).flatten(1, 2)  # (B, H*W, d)
            pos = self.position_embedding(mask).flatten(1, 2).to(src.dtype)  # (B, H*W, d)
            if self.level_embed is not None:
                pos = pos + self.level_embed[level]
            srcs.append(src)
            poss.append(pos)
            masks.append(mask.flatten(1))  # (B, H*W)
        src, pos, mask = torch.cat(srcs, 1), torch.cat(poss, 1), torch.cat(masks, 1)  # (B, N, d) (B, N, d) (B, N)
        if self.two_stage:
            memory = self.transformer.encoder(src, pos, mask)  # (B, N, d)
            enc, ref, tgt = self._proposals(memory, mask, torch.cat(token_boxes, 1))  # {..}, (B, Q, 4), (B, Q, d)
            query_pos = self.ref_point_head(box_sine_embed(ref.sigmoid(), self.transformer.d_model // 2))
            hs = self.transformer.decoder(tgt, memory, pos, mask, query_pos.to(tgt.dtype))  # (L, B, Q, d)
        elif self.anchor_queries:
            ref = self.refpoint_embed.weight  # (Q, 4)
            query_pos = self.ref_point_head(box_sine_embed(ref.sigmoid(), self.transformer.d_model // 2))  # (Q, d)
            hs, _ = self.transformer(src, mask, query_pos, pos)  # (L, B, Q, d)
        else:
            ref = None
            hs, _ = self.transformer(src, mask, self.query_embed.weight, pos)  # (L, B, Q, d)
        out = self._heads(hs, ref)
        if self.two_stage:
            out["enc_outputs"] = enc
        return out

    def _token_boxes(self, mask: torch.Tensor, level: int) -> torch.Tensor:
        """Boxes (B, H*W, 4) cxcywh in [0, 1] centred on each token of a (B, H, W) level, of side anchor_size x
        2^level; padding tokens get a centred box (their scores are masked, so they are never selected)."""
        not_mask = (~mask).to(torch.float32)  # (B, H, W)
        y, x = not_mask.cumsum(1), not_mask.cumsum(2)  # (B, H, W)
        cy = (y - 0.5) / y[:, -1:, :].clamp(min=1)
        cx = (x - 0.5) / x[:, :, -1:].clamp(min=1)
        side = torch.full_like(cx, min(self.anchor_size * 2 ** level, 0.9))
        boxes = torch.stack([cx, cy, side, side], -1)  # (B, H, W, 4)
        return boxes.masked_fill(mask[..., None], 0.5).flatten(1, 2)

    def _proposals(self, memory: torch.Tensor, mask: torch.Tensor, token_boxes: torch.Tensor):
        """Two-stage: per-token predictions ({pred_logits (B, N, K(+1)), pred_boxes (B, N, 4)}), the reference
        boxes (B, Q, 4) in logit space of the Q best tokens (detached) and their features (B, Q, d), the decoder's
        content queries (as in Efficient DETR). mask: (B, N) True on padding tokens."""
        feats = self.enc_output(memory)  # (B, N, d)
        logits = self.enc_class_embed(feats).float()  # (B, N, K) or (B, N, K+1)
        box_logits = self.enc_bbox_embed(feats).float() + inverse_sigmoid(token_boxes)  # (B, N, 4)
        score = logits.max(-1).values if self.focal else 1 - logits.softmax(-1)[..., -1]  # (B, N)
        score = score.masked_fill(mask, float("-inf"))
        top = score.topk(min(self.num_queries, score.shape[1]), dim=1).indices  # (B, Q)
        ref = torch.gather(box_logits, 1, top[..., None].expand(-1, -1, 4)).detach()  # (B, Q, 4)
        tgt = torch.gather(feats, 1, top[..., None].expand(-1, -1, feats.shape[-1]))  # (B, Q, d)
        # Padding tokens get a box far outside the image, so that matching never picks them.
        boxes = torch.where(mask[..., None], box_logits.new_tensor([-10.0, -10.0, 0.01, 0.01]),
                            box_logits.sigmoid())  # (B, N, 4)
        return {"pred_logits": logits, "pred_boxes": boxes}, ref, tgt

    def _heads(self, hs: torch.Tensor, ref: torch.Tensor | None) -> dict:
        """Class and box heads on decoder outputs hs (L, B, Q, d); ref: reference boxes in logit space (Q, 4) or
        (B, Q, 4), or None. Logits and the box sigmoid are computed in float32 (also under autocast)."""
        outputs_class = self.class_embed(hs).float()  # (L, B, Q, K+1) (K with focal)
        box_logits = self.bbox_embed(hs).float()  # (L, B, Q, 4)
        outputs_coord = (box_logits if ref is None else box_logits + ref.float()).sigmoid()  # (L, B, Q, 4)
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": c, "pred_boxes": b}
                                  for c, b in zip(outputs_class[:-1], outputs_coord[:-1])]
        return out


def build_model(config) -> tuple[DETR, nn.Module, dict[str, nn.Module]]:
    """(model, criterion, postprocessors) from a `ModelConfig`, or anything `ModelConfig.from_any` reads (e.g. the
    parsed flags of `main.get_args_parser()`). Raises ValueError (one line naming the flag) for unusable values."""
    cfg = ModelConfig.from_any(config)
    num_classes = cfg.num_classes if cfg.num_classes is not None else COCO_NUM_CLASSES
    backbone = build_backbone(cfg.backbone, drop_path_rate=cfg.drop_path, sr_ratios=cfg.sr_ratios,
                              local_layers=cfg.local_layers, grad_checkpointing=cfg.grad_checkpointing,
                              out_indices=tuple(s - 1 for s in cfg.backbone_stages))
    transformer = Transformer(d_model=cfg.hidden_dim, nhead=cfg.nheads, num_encoder_layers=cfg.enc_layers,
                              num_decoder_layers=cfg.dec_layers, dim_feedforward=cfg.dim_feedforward,
                              dropout=cfg.dropout, normalize_before=cfg.pre_norm,
                              grad_checkpointing=cfg.grad_checkpointing)
    model = DETR(backbone, transformer, num_classes=num_classes, num_queries=cfg.num_queries, aux_loss=cfg.aux_loss,
                 anchor_queries=cfg.anchor_queries, focal=cfg.focal_loss, anchor_size=cfg.anchor_size,
                 two_stage=cfg.two_stage, position_embedding=cfg.position_embedding)
    criterion = build_criterion(cfg, num_classes)
    return model, criterion, {"bbox": SigmoidPostProcess() if cfg.focal_loss else PostProcess()}
