"""DETR on a PVT backbone (Carion et al. 2020; the PVT paper's "PVT + DETR" detector) and `build_model`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert

from pvt_detr.criterion import SetCriterion, build_criterion
from pvt_detr.models.registry import build_backbone
from pvt_detr.nested_tensor import NestedTensor, nested_tensor_from_tensor_list
from pvt_detr.position_encoding import PositionEmbeddingSine
from pvt_detr.postprocess import PostProcess
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

    Opt-in convergence aids (defaults give plain DETR):
    - `anchor_queries`: each query owns a learned reference box (DAB-DETR style, Liu et al. 2022); its sine
      encoding through a small MLP is the query position, and the box head predicts an offset to it in logit
      space (last box layer initialised to zero, so training starts from boxes spread over the image).
    - `focal`: the class head has `num_classes` sigmoid outputs (no no-object class) with the focal-loss prior
      bias (Deformable DETR); use with `SigmoidFocalSetCriterion` and `SigmoidPostProcess`.
    - `num_groups` > 1: Group DETR (Chen et al. 2023) training: that many independent query groups, each
      decoded separately (no attention between groups) and matched one-to-one; evaluation uses group 0 only.
    """

    def __init__(self, backbone: nn.Module, transformer: Transformer, num_classes: int, num_queries: int,
                 aux_loss: bool = True, anchor_queries: bool = False, focal: bool = False, num_groups: int = 1,
                 anchor_size: float = 0.25):
        super().__init__()
        d = transformer.d_model
        self.backbone = backbone
        self.transformer = transformer
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.position_embedding = PositionEmbeddingSine(d // 2, normalize=True)
        # One projection per backbone stage used (DETR: a 1x1 conv; here the equal Linear on channels-last maps).
        self.input_proj = nn.ModuleList(nn.Linear(c, d) for c in backbone.num_channels)
        # Several stages: their tokens are concatenated and told apart by a learned level embedding.
        self.level_embed = nn.Parameter(torch.zeros(len(backbone.num_channels), d)) \
            if len(backbone.num_channels) > 1 else None
        self.anchor_queries = anchor_queries
        self.focal = focal
        self.num_groups = num_groups
        total_queries = num_queries * num_groups
        if anchor_queries:
            self.refpoint_embed = nn.Embedding(total_queries, 4)  # reference boxes (cx, cy, w, h) in logit space
            self.ref_point_head = MLP(2 * d, d, d, 2)  # sine(box) (4 * d/2) -> query position
        else:
            self.query_embed = nn.Embedding(total_queries, d)
        self.class_embed = nn.Linear(d, num_classes if focal else num_classes + 1)
        self.bbox_embed = MLP(d, d, 4, 3)
        if self.level_embed is not None:
            nn.init.normal_(self.level_embed)
        if focal:  # prior probability 0.01 for every class (RetinaNet / Deformable DETR)
            nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))
        if anchor_queries:
            with torch.no_grad():
                g = torch.Generator().manual_seed(0)
                centres = torch.rand(total_queries, 2, generator=g)  # (Q, 2) uniform over the image
                sizes = torch.full((total_queries, 2), anchor_size)
                self.refpoint_embed.weight.copy_(inverse_sigmoid(torch.cat([centres, sizes], 1)))
            nn.init.zeros_(self.bbox_embed.layers[-1].weight)
            nn.init.zeros_(self.bbox_embed.layers[-1].bias)

    def _query_pos(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Query positions (G*Q, d) and reference boxes in logit space (G*Q, 4) (None without anchor queries)."""
        if not self.anchor_queries:
            return self.query_embed.weight, None
        ref = self.refpoint_embed.weight  # (G*Q, 4)
        return self.ref_point_head(box_sine_embed(ref.sigmoid(), self.transformer.d_model // 2)), ref

    def forward(self, samples: NestedTensor | torch.Tensor | list[torch.Tensor]) -> dict:
        """samples: NestedTensor (B, 3, H, W) + mask (B, H, W), a (B, 3, H, W) tensor, or a list of (3, H_i, W_i).

        Returns pred_logits (B, Q, K+1) (last index = no object), pred_boxes (B, Q, 4) cxcywh normalised to [0, 1]
        by each image's unpadded size, and aux_outputs (one such dict per earlier decoder layer) if aux_loss.
        """
        if isinstance(samples, (list, tuple)):
            samples = nested_tensor_from_tensor_list(samples)
        elif isinstance(samples, torch.Tensor):
            samples = NestedTensor(samples, None)
        srcs, masks, poss = [], [], []
        for level, feature in enumerate(self.backbone.forward_nested(samples)):
            x, mask = feature.decompose()  # (B, C, H, W), (B, H, W)
            src = self.input_proj[level](x.permute(0, 2, 3, 1)).flatten(1, 2)  # (B, H*W, d)
            pos = self.position_embedding(mask).flatten(1, 2).to(src.dtype)  # (B, H*W, d)
            if self.level_embed is not None:
                pos = pos + self.level_embed[level]
            srcs.append(src)
            poss.append(pos)
            masks.append(mask.flatten(1))  # (B, H*W)
        src, pos, mask = torch.cat(srcs, 1), torch.cat(poss, 1), torch.cat(masks, 1)  # (B, N, d) (B, N, d) (B, N)
        mask = mask if bool(mask.any()) else None
        query_pos, ref = self._query_pos()  # (G*Q, d), (G*Q, 4) or None
        groups = self.num_groups if self.training else 1
        if groups == 1:
            query_pos = query_pos[: self.num_queries]
            ref = ref[: self.num_queries] if ref is not None else None
            hs, _ = self.transformer(src, mask, query_pos, pos)  # (L, B, Q, d)
        else:
            hs = self._decode_groups(src, mask, query_pos, pos, groups)  # (L, B, G*Q, d)
        outputs_class = self.class_embed(hs)  # (L, B, Q, K+1) (K with focal)
        box_logits = self.bbox_embed(hs)  # (L, B, Q, 4)
        outputs_coord = (box_logits if ref is None else box_logits + ref).sigmoid()  # (L, B, Q, 4)
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": c, "pred_boxes": b}
                                  for c, b in zip(outputs_class[:-1], outputs_coord[:-1])]
        return out

    def _decode_groups(self, src: torch.Tensor, mask: torch.Tensor | None, query_pos: torch.Tensor,
                       pos: torch.Tensor, groups: int) -> torch.Tensor:
        """Group DETR decoding: the encoder runs once, each query group is decoded as its own batch entry (the same
        as masking self-attention between groups). Returns (L, B, G*Q, d), groups concatenated along queries."""
        B, Q = src.shape[0], self.num_queries
        memory = self.transformer.encoder(src, pos, mask)  # (B, N, d)
        rep = lambda x: x.repeat_interleave(groups, 0)  # noqa: E731  (B, ...) -> (B*G, ...)
        query_pos = query_pos.view(groups, Q, -1).repeat(B, 1, 1)  # (B*G, Q, d), batch-major
        hs = self.transformer.decoder(torch.zeros_like(query_pos), rep(memory), rep(pos),
                                      rep(mask) if mask is not None else None, query_pos)  # (L, B*G, Q, d)
        return hs.reshape(hs.shape[0], B, groups * Q, -1)


class SigmoidPostProcess(nn.Module):
    """PostProcess for sigmoid (focal) class heads (Deformable DETR): the `num_select` best (query, class) scores
    per image, boxes to absolute xyxy. Same output format as `PostProcess`."""

    def __init__(self, num_select: int = 100):
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()  # (B, Q, K), (B, Q, 4)
        B, Q, K = logits.shape
        scores, index = logits.sigmoid().flatten(1).topk(min(self.num_select, Q * K), dim=1)  # (B, S)
        labels, query = index % K, torch.div(index, K, rounding_mode="floor")  # (B, S)
        boxes = torch.gather(box_convert(boxes, "cxcywh", "xyxy"), 1, query[..., None].expand(-1, -1, 4))  # (B, S, 4)
        h, w = target_sizes.unbind(1)  # (B,)
        boxes = boxes * torch.stack([w, h, w, h], dim=1).to(boxes)[:, None, :]
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]


def _check_args(args) -> None:
    if not args.backbone_stages or any(s not in (1, 2, 3, 4) for s in args.backbone_stages):
        raise ValueError(f"--backbone_stages must be stage numbers 1-4, got {args.backbone_stages}")
    if args.hidden_dim % args.nheads or args.hidden_dim % 2:
        raise ValueError(f"--hidden_dim {args.hidden_dim} must be even and divisible by --nheads {args.nheads}")
    for name in ("enc_layers", "dec_layers", "num_queries", "dim_feedforward"):
        if getattr(args, name) < (0 if name == "enc_layers" else 1):
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    if not 0 <= args.dropout < 1 or not 0 <= args.drop_path < 1:
        raise ValueError("--dropout and --drop_path must be in [0, 1)")
    if args.num_classes is not None and args.num_classes < 1:
        raise ValueError(f"--num_classes must be >= 1, got {args.num_classes}")
    if getattr(args, "num_groups", 1) < 1:
        raise ValueError(f"--num_groups must be >= 1, got {args.num_groups}")
    if not 0 < getattr(args, "anchor_size", 0.25) < 1:
        raise ValueError(f"--anchor_size must be in (0, 1), got {args.anchor_size}")


def build_model(args) -> tuple[DETR, SetCriterion, dict[str, nn.Module]]:
    """Builds (model, criterion, postprocessors) from the parsed flags of `main.get_args_parser()`."""
    _check_args(args)
    num_classes = args.num_classes if args.num_classes is not None else COCO_NUM_CLASSES
    backbone = build_backbone(args.backbone, drop_path_rate=args.drop_path,
                              out_indices=tuple(s - 1 for s in args.backbone_stages))
    transformer = Transformer(d_model=args.hidden_dim, nhead=args.nheads, num_encoder_layers=args.enc_layers,
                              num_decoder_layers=args.dec_layers, dim_feedforward=args.dim_feedforward,
                              dropout=args.dropout, normalize_before=args.pre_norm)
    focal = getattr(args, "focal_loss", False)
    model = DETR(backbone, transformer, num_classes=num_classes, num_queries=args.num_queries, aux_loss=args.aux_loss,
                 anchor_queries=getattr(args, "anchor_queries", False), focal=focal,
                 num_groups=getattr(args, "num_groups", 1), anchor_size=getattr(args, "anchor_size", 0.25))
    criterion = build_criterion(args, num_classes)
    return model, criterion, {"bbox": SigmoidPostProcess() if focal else PostProcess()}
