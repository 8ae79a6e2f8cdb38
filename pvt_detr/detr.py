"""DETR on a PVT backbone (Carion et al. 2020; the PVT paper's "PVT + DETR" detector) and `build_model`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert

from pvt_detr.backbone.registry import build_backbone
from pvt_detr.criterion import SetCriterion, build_criterion
from pvt_detr.matmul import Linear
from pvt_detr.nested_tensor import NestedTensor, is_exporting, nested_tensor_from_tensor_list
from pvt_detr.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine
from pvt_detr.postprocess import PostProcess
from pvt_detr.transformer import Transformer

COCO_NUM_CLASSES = 91  # max COCO category id (90) + 1


class MLP(nn.Module):
    """Plain multi-layer perceptron with ReLU between layers (DETR's box head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

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


POSITION_EMBEDDINGS = {"sine": "sine", "v2": "sine", "learned": "learned", "v3": "learned"}  # DETR's names


class DETR(nn.Module):
    """Backbone stage maps -> linear input projection -> transformer -> class and box heads.

    `position_embedding`: the encoder tokens' positions, DETR's "sine" (normalised to each image's unpadded extent;
    alias "v2") or "learned" (a row and a column embedding per cell, at most 50 x 50 cells; alias "v3").

    Opt-in convergence aids (defaults give plain DETR):
    - `anchor_queries`: each query owns a learned reference box (DAB-DETR style, Liu et al. 2022); its sine
      encoding through a small MLP is the query position, and the box head predicts an offset to it in logit
      space (last box layer initialised to zero, so training starts from boxes spread over the image).
    - `focal`: the class head has `num_classes` sigmoid outputs (no no-object class) with the focal-loss prior
      bias (Deformable DETR); use with `SigmoidFocalSetCriterion` and `SigmoidPostProcess`.
    - `num_groups` > 1: Group DETR (Chen et al. 2023) training: that many independent query groups, each
      decoded separately (no attention between groups) and matched one-to-one; evaluation uses group 0 only.
    - `dn_groups` > 0 (needs `anchor_queries`): DN-DETR denoising training (Li et al. 2022): per image, that many
      copies of its ground-truth boxes, jittered (centre by up to `dn_box_noise` x half the size, size by up to
      `dn_box_noise` x the size) and with labels flipped with probability `dn_label_noise`, are decoded as extra
      queries (reference box = noised box, content = label embedding) that must reconstruct their own box and
      class; no matching. Decoded apart from the matching queries (no attention between the two); training only.
      `forward` then needs the targets.
    - `two_stage` (needs `anchor_queries`): Deformable DETR's two-stage scheme: every encoder token predicts a
      class and a box (an offset to a box of `anchor_size` centred on the token), trained with the set loss
      (Hungarian matching over the tokens, `enc_outputs`); the `num_queries` best-scoring token boxes (detached)
      are the decoder's reference boxes instead of learned ones, their features its content queries.
    """

    def __init__(self, backbone: nn.Module, transformer: Transformer, num_classes: int, num_queries: int,
                 aux_loss: bool = True, anchor_queries: bool = False, focal: bool = False, num_groups: int = 1,
                 anchor_size: float = 0.25, dn_groups: int = 0, dn_box_noise: float = 0.4,
                 dn_label_noise: float = 0.2, two_stage: bool = False, position_embedding: str = "sine"):
        super().__init__()
        if position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"position_embedding must be one of {sorted(POSITION_EMBEDDINGS)}, got "
                             f"{position_embedding!r}")
        if (dn_groups > 0 or two_stage) and not anchor_queries:
            raise ValueError("denoising training (dn_groups > 0) and two_stage need anchor_queries")
        if two_stage and num_groups > 1:
            raise ValueError("two_stage does not support num_groups > 1")
        d = transformer.d_model
        self.backbone = backbone
        self.transformer = transformer
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        if POSITION_EMBEDDINGS[position_embedding] == "sine":
            self.position_embedding = PositionEmbeddingSine(d // 2, normalize=True)
        else:
            self.position_embedding = PositionEmbeddingLearned(d // 2)
        # One projection per backbone stage used (DETR: a 1x1 conv; here the equal Linear on channels-last maps).
        self.input_proj = nn.ModuleList(Linear(c, d) for c in backbone.num_channels)
        # Several stages: their tokens are concatenated and told apart by a learned level embedding.
        self.level_embed = nn.Parameter(torch.zeros(len(backbone.num_channels), d)) \
            if len(backbone.num_channels) > 1 else None
        self.anchor_queries = anchor_queries
        self.focal = focal
        self.num_groups = num_groups
        self.dn_groups, self.dn_box_noise, self.dn_label_noise = dn_groups, dn_box_noise, dn_label_noise
        if dn_groups > 0:
            self.label_enc = nn.Embedding(num_classes + 1, d)  # denoising content queries; last index = padding
        total_queries = num_queries * num_groups
        self.two_stage, self.anchor_size = two_stage, anchor_size
        if two_stage:  # per-token class and box heads on the (normed, projected) encoder memory
            self.enc_output = nn.Sequential(Linear(d, d), nn.LayerNorm(d))
            self.enc_class_embed = Linear(d, num_classes if focal else num_classes + 1)
            self.enc_bbox_embed = MLP(d, d, 4, 3)
            nn.init.zeros_(self.enc_bbox_embed.layers[-1].weight)
            nn.init.zeros_(self.enc_bbox_embed.layers[-1].bias)
            if focal:
                nn.init.constant_(self.enc_class_embed.bias, -math.log((1 - 0.01) / 0.01))
        if anchor_queries:
            if not two_stage:
                self.refpoint_embed = nn.Embedding(total_queries, 4)  # reference boxes (cx, cy, w, h), logit space
            self.ref_point_head = MLP(2 * d, d, d, 2)  # sine(box) (4 * d/2) -> query position
        else:
            self.query_embed = nn.Embedding(total_queries, d)
        self.class_embed = Linear(d, num_classes if focal else num_classes + 1)
        self.bbox_embed = MLP(d, d, 4, 3)
        if self.level_embed is not None:
            nn.init.normal_(self.level_embed)
        if focal:  # prior probability 0.01 for every class (RetinaNet / Deformable DETR)
            nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))
        if anchor_queries and not two_stage:
            with torch.no_grad():
                g = torch.Generator().manual_seed(0)
                centres = torch.rand(total_queries, 2, generator=g)  # (Q, 2) uniform over the image
                sizes = torch.full((total_queries, 2), anchor_size)
                self.refpoint_embed.weight.copy_(inverse_sigmoid(torch.cat([centres, sizes], 1)))
        if anchor_queries:
            nn.init.zeros_(self.bbox_embed.layers[-1].weight)
            nn.init.zeros_(self.bbox_embed.layers[-1].bias)

    def _query_pos(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Query positions (G*Q, d) and reference boxes in logit space (G*Q, 4) (None without anchor queries)."""
        if not self.anchor_queries:
            return self.query_embed.weight, None
        ref = self.refpoint_embed.weight  # (G*Q, 4)
        return self.ref_point_head(box_sine_embed(ref.sigmoid(), self.transformer.d_model // 2)), ref

    @property
    def takes_targets(self) -> bool:
        """True if training `forward` wants the targets too (denoising training)."""
        return self.dn_groups > 0

    def forward(self, samples: NestedTensor | torch.Tensor | list[torch.Tensor],
                targets: list[dict] | None = None) -> dict:
        """samples: NestedTensor (B, 3, H, W) + mask (B, H, W), a (B, 3, H, W) tensor, or a list of (3, H_i, W_i).

        Returns pred_logits (B, Q, K+1) (last index = no object), pred_boxes (B, Q, 4) cxcywh normalised to [0, 1]
        by each image's unpadded size, and aux_outputs (one such dict per earlier decoder layer) if aux_loss.
        targets: only read in training with denoising (`dn_groups` > 0): adds `dn_outputs` (pred_logits,
        pred_boxes, aux_outputs, and `indices`, the fixed (query, target) pairs per image).
        """
        if isinstance(samples, (list, tuple)):
            samples = nested_tensor_from_tensor_list(samples)
        elif isinstance(samples, torch.Tensor):
            samples = NestedTensor(samples, None)
        srcs, masks, poss, proposals = [], [], [], []
        for level, feature in enumerate(self.backbone.forward_nested(samples)):
            x, mask = feature.decompose()  # (B, C, H, W), (B, H, W)
            if self.two_stage:
                proposals.append(self._token_boxes(mask, level))  # (B, H*W, 4)
            src = self.input_proj[level](x.permute(0, 2, 3, 1)).flatten(1, 2)  # (B, H*W, d)
            pos = self.position_embedding(mask).flatten(1, 2).to(src.dtype)  # (B, H*W, d)
            if self.level_embed is not None:
                pos = pos + self.level_embed[level]
            srcs.append(src)
            poss.append(pos)
            masks.append(mask.flatten(1))  # (B, H*W)
        src, pos, mask = torch.cat(srcs, 1), torch.cat(poss, 1), torch.cat(masks, 1)  # (B, N, d) (B, N, d) (B, N)
        mask = mask if is_exporting() or bool(mask.any()) else None  # an exported graph always takes the mask
        groups = self.num_groups if self.training else 1
        denoise = self.training and self.dn_groups > 0 and targets is not None and any(len(t["labels"])
                                                                                          for t in targets)
        memory = None
        if self.two_stage:
            memory = self.transformer.encoder(src, pos, mask)  # (B, N, d)
            enc, ref, tgt = self._proposals(memory, mask, torch.cat(proposals, 1))  # {..}, (B, Q, 4), (B, Q, d)
            query_pos = self.ref_point_head(box_sine_embed(ref.sigmoid(), self.transformer.d_model // 2))
            hs = self._decode(memory, pos, mask, tgt, query_pos)  # (L, B, Q, d)
        elif groups == 1 and not denoise:
            query_pos, ref = self._query_pos()  # (G*Q, d), (G*Q, 4) or None
            query_pos = query_pos[: self.num_queries]
            ref = ref[: self.num_queries] if ref is not None else None
            hs, _ = self.transformer(src, mask, query_pos, pos)  # (L, B, Q, d)
        else:
            query_pos, ref = self._query_pos()
            memory = self.transformer.encoder(src, pos, mask)  # (B, N, d)
            query_pos = query_pos[: groups * self.num_queries]
            ref = ref[: groups * self.num_queries] if ref is not None else None
            Q = self.num_queries
            tgt = torch.zeros(groups * src.shape[0], Q, src.shape[-1], dtype=src.dtype, device=src.device)
            hs = self._decode(memory, pos, mask, tgt, query_pos.view(groups, Q, -1).repeat(src.shape[0], 1, 1))
            hs = hs.reshape(hs.shape[0], src.shape[0], groups * Q, -1)  # (L, B, G*Q, d)
        out = self._heads(hs, ref)
        if self.two_stage:
            out["enc_outputs"] = enc
        if denoise:
            tgt, dn_pos, dn_ref, indices = self._denoising_queries(targets)  # (B*K, T, d) x2, (B, K*T, 4)
            hs = self._decode(memory, pos, mask, tgt, dn_pos)  # (L, B*K, T, d)
            out["dn_outputs"] = self._heads(hs.reshape(hs.shape[0], src.shape[0], -1, hs.shape[-1]), dn_ref)
            out["dn_outputs"]["indices"] = indices
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

    def _proposals(self, memory: torch.Tensor, mask: torch.Tensor | None, token_boxes: torch.Tensor):
        """Two-stage: per-token predictions ({pred_logits (B, N, K(+1)), pred_boxes (B, N, 4)}), the reference
        boxes (B, Q, 4) in logit space of the Q best tokens (detached) and their features (B, Q, d), the decoder's
        content queries (as in Efficient DETR)."""
        feats = self.enc_output(memory)  # (B, N, d)
        logits = self.enc_class_embed(feats)  # (B, N, K) or (B, N, K+1)
        box_logits = self.enc_bbox_embed(feats) + inverse_sigmoid(token_boxes)  # (B, N, 4)
        score = logits.max(-1).values if self.focal else 1 - logits.softmax(-1)[..., -1]  # (B, N)
        if mask is not None:
            score = score.masked_fill(mask, float("-inf"))
        top = score.topk(min(self.num_queries, score.shape[1]), dim=1).indices  # (B, Q)
        ref = torch.gather(box_logits, 1, top[..., None].expand(-1, -1, 4)).detach()  # (B, Q, 4)
        tgt = torch.gather(feats, 1, top[..., None].expand(-1, -1, feats.shape[-1]))  # (B, Q, d)
        boxes = box_logits.sigmoid()  # (B, N, 4)
        if mask is not None:  # padding tokens: a box far outside the image, so that matching never picks them
            boxes = torch.where(mask[..., None], boxes.new_tensor([-10.0, -10.0, 0.01, 0.01]), boxes)
        return {"pred_logits": logits, "pred_boxes": boxes}, ref, tgt

    def _heads(self, hs: torch.Tensor, ref: torch.Tensor | None) -> dict:
        """Class and box heads on decoder outputs hs (L, B, Q, d); ref: reference boxes in logit space (Q, 4) or
        (B, Q, 4), or None."""
        outputs_class = self.class_embed(hs)  # (L, B, Q, K+1) (K with focal)
        box_logits = self.bbox_embed(hs)  # (L, B, Q, 4)
        outputs_coord = (box_logits if ref is None else box_logits + ref).sigmoid()  # (L, B, Q, 4)
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": c, "pred_boxes": b}
                                  for c, b in zip(outputs_class[:-1], outputs_coord[:-1])]
        return out

    def _decode(self, memory: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None, tgt: torch.Tensor,
                query_pos: torch.Tensor) -> torch.Tensor:
        """Decodes E = B * G query sets (tgt, query_pos (E, Q, d); entries e * G .. e * G + G - 1 belong to image e)
        against memory, pos (B, N, d), mask (B, N): each set is its own batch entry, which equals masking attention
        between the sets (Group DETR). Returns (L, E, Q, d)."""
        groups = tgt.shape[0] // memory.shape[0]
        rep = lambda x: x.repeat_interleave(groups, 0) if groups > 1 else x  # noqa: E731  (B, ...) -> (B*G, ...)
        return self.transformer.decoder(tgt, rep(memory), rep(pos), rep(mask) if mask is not None else None,
                                        query_pos)

    def _denoising_queries(self, targets: list[dict]):
        """DN-DETR queries: K noised copies of each image's boxes, padded to T = max boxes per image.

        Returns content (B*K, T, d), positions (B*K, T, d), reference boxes in logit space (B, K*T, 4) and the fixed
        per-image (query indices, target indices) into the K*T denoising queries.
        """
        B, K, T = len(targets), self.dn_groups, max(len(t["labels"]) for t in targets)
        device = targets[0]["boxes"].device
        boxes = torch.full((B, K, T, 4), 0.5, device=device)  # (B, K, T, 4) cxcywh; padding: a centred box
        labels = torch.full((B, K, T), self.num_classes, dtype=torch.int64, device=device)  # padding index
        indices = []
        for b, t in enumerate(targets):
            n = len(t["labels"])
            boxes[b, :, :n] = t["boxes"].float()
            labels[b, :, :n] = t["labels"]
            queries = (torch.arange(K)[:, None] * T + torch.arange(n)[None]).flatten()  # (K*n,)
            indices.append((queries, torch.arange(n).repeat(K)))
        real = labels < self.num_classes  # (B, K, T)
        if self.dn_label_noise > 0:
            flip = (torch.rand(labels.shape, device=device) < self.dn_label_noise) & real
            labels = torch.where(flip, torch.randint_like(labels, 0, self.num_classes), labels)
        if self.dn_box_noise > 0:
            diff = torch.cat([boxes[..., 2:] / 2, boxes[..., 2:]], -1) * self.dn_box_noise  # (B, K, T, 4)
            boxes = (boxes + (torch.rand_like(boxes) * 2 - 1) * diff).clamp(0.0, 1.0)
        d = self.transformer.d_model
        content = self.label_enc(labels).view(B * K, T, d)
        query_pos = self.ref_point_head(box_sine_embed(boxes, d // 2)).view(B * K, T, d)
        return content, query_pos, inverse_sigmoid(boxes).view(B, K * T, 4), indices


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


def check_model_args(args) -> None:
    """Raises ValueError (one line naming the flag) for model flag values `build_model` cannot use."""
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
    for name in ("num_groups", "two_stage_repeat"):
        if getattr(args, name, 1) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if getattr(args, "dn_groups", 0) < 0:
        raise ValueError(f"--dn_groups must be >= 0, got {args.dn_groups}")
    sr_ratios = getattr(args, "sr_ratios", None)
    if sr_ratios is not None and (len(sr_ratios) != 4 or any(r < 1 for r in sr_ratios)):
        raise ValueError(f"--sr_ratios must be 4 ratios >= 1 (one per stage), got {sr_ratios}")
    local_layers = getattr(args, "local_layers", None)
    if local_layers is not None and (len(local_layers) != 4 or any(n < 0 for n in local_layers)):
        raise ValueError(f"--local_layers must be 4 counts >= 0 (one per stage), got {local_layers}")
    if not 0 < getattr(args, "anchor_size", 0.25) < 1:
        raise ValueError(f"--anchor_size must be in (0, 1), got {args.anchor_size}")
    two_stage, dn_groups = getattr(args, "two_stage", False), getattr(args, "dn_groups", 0)
    if (two_stage or dn_groups > 0) and not getattr(args, "anchor_queries", False):
        raise ValueError(f"--{'two_stage' if two_stage else 'dn_groups'} needs --anchor_queries")
    if two_stage and getattr(args, "num_groups", 1) > 1:
        raise ValueError(f"--two_stage does not support --num_groups > 1, got {args.num_groups}")
    if getattr(args, "position_embedding", "sine") not in POSITION_EMBEDDINGS:
        raise ValueError(f"--position_embedding must be one of {sorted(POSITION_EMBEDDINGS)}, got "
                         f"{args.position_embedding!r}")


def build_model(args) -> tuple[DETR, SetCriterion, dict[str, nn.Module]]:
    """Builds (model, criterion, postprocessors) from the parsed flags of `main.get_args_parser()`."""
    check_model_args(args)
    num_classes = args.num_classes if args.num_classes is not None else COCO_NUM_CLASSES
    overrides = {name: tuple(getattr(args, name)) for name in ("sr_ratios", "local_layers")
                 if getattr(args, name, None) is not None}
    backbone = build_backbone(args.backbone, drop_path_rate=args.drop_path,
                              out_indices=tuple(s - 1 for s in args.backbone_stages), **overrides)
    transformer = Transformer(d_model=args.hidden_dim, nhead=args.nheads, num_encoder_layers=args.enc_layers,
                              num_decoder_layers=args.dec_layers, dim_feedforward=args.dim_feedforward,
                              dropout=args.dropout, normalize_before=args.pre_norm)
    focal = getattr(args, "focal_loss", False)
    model = DETR(backbone, transformer, num_classes=num_classes, num_queries=args.num_queries, aux_loss=args.aux_loss,
                 anchor_queries=getattr(args, "anchor_queries", False), focal=focal,
                 num_groups=getattr(args, "num_groups", 1), anchor_size=getattr(args, "anchor_size", 0.25),
                 dn_groups=getattr(args, "dn_groups", 0), dn_box_noise=getattr(args, "dn_box_noise", 0.4),
                 dn_label_noise=getattr(args, "dn_label_noise", 0.2), two_stage=getattr(args, "two_stage", False),
                 position_embedding=getattr(args, "position_embedding", "sine"))
    criterion = build_criterion(args, num_classes)
    return model, criterion, {"bbox": SigmoidPostProcess() if focal else PostProcess()}
