"""DETR on a PVT backbone (Carion et al. 2020; the PVT paper's "PVT + DETR" detector) and `build_model`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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


class DETR(nn.Module):
    """Backbone stage maps -> linear input projection -> transformer -> class and box heads."""

    def __init__(self, backbone: nn.Module, transformer: Transformer, num_classes: int, num_queries: int,
                 aux_loss: bool = True):
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
        self.query_embed = nn.Embedding(num_queries, d)
        self.class_embed = nn.Linear(d, num_classes + 1)
        self.bbox_embed = MLP(d, d, 4, 3)
        if self.level_embed is not None:
            nn.init.normal_(self.level_embed)

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
        hs, _ = self.transformer(src, mask if bool(mask.any()) else None, self.query_embed.weight, pos)  # (L,B,Q,d)
        outputs_class = self.class_embed(hs)  # (L, B, Q, K+1)
        outputs_coord = self.bbox_embed(hs).sigmoid()  # (L, B, Q, 4)
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": c, "pred_boxes": b}
                                  for c, b in zip(outputs_class[:-1], outputs_coord[:-1])]
        return out


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


def build_model(args) -> tuple[DETR, SetCriterion, dict[str, nn.Module]]:
    """Builds (model, criterion, postprocessors) from the parsed flags of `main.get_args_parser()`."""
    _check_args(args)
    num_classes = args.num_classes if args.num_classes is not None else COCO_NUM_CLASSES
    backbone = build_backbone(args.backbone, drop_path_rate=args.drop_path,
                              out_indices=tuple(s - 1 for s in args.backbone_stages))
    transformer = Transformer(d_model=args.hidden_dim, nhead=args.nheads, num_encoder_layers=args.enc_layers,
                              num_decoder_layers=args.dec_layers, dim_feedforward=args.dim_feedforward,
                              dropout=args.dropout, normalize_before=args.pre_norm)
    model = DETR(backbone, transformer, num_classes=num_classes, num_queries=args.num_queries, aux_loss=args.aux_loss)
    criterion = build_criterion(args, num_classes)
    return model, criterion, {"bbox": PostProcess()}
