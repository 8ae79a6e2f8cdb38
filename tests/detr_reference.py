"""An independent, straightforward DETR written from the official formulas (facebookresearch/detr), for tests.

Sequence-first `nn.MultiheadAttention` layers, a 1 x 1 `nn.Conv2d` input projection, the pixel mask resized to the
feature map by nearest interpolation, DETR's sine position encoding, its matcher and set loss with explicit box
maths, and the official parameter names (`transformer.encoder.layers.0.self_attn.in_proj_weight`,
`query_embed.weight`, `input_proj.weight` ...). Slow and simple on purpose; it shares no code with `pvt_detr`.
"""

import math

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn


class RefEncoderLayer(nn.Module):
    def __init__(self, d, heads, ffn, pre_norm):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=0.0)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.pre_norm = pre_norm

    def forward(self, src, key_padding_mask, pos):  # src, pos: (N, B, d)
        if self.pre_norm:
            x = self.norm1(src)
            src = src + self.self_attn(x + pos, x + pos, x, key_padding_mask=key_padding_mask)[0]
            return src + self.linear2(F.relu(self.linear1(self.norm2(src))))
        src = self.norm1(src + self.self_attn(src + pos, src + pos, src, key_padding_mask=key_padding_mask)[0])
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class RefDecoderLayer(nn.Module):
    def __init__(self, d, heads, ffn, pre_norm):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=0.0)
        self.multihead_attn = nn.MultiheadAttention(d, heads, dropout=0.0)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.pre_norm = pre_norm

    def forward(self, tgt, memory, memory_key_padding_mask, pos, query_pos):  # tgt: (Q, B, d); memory: (N, B, d)
        if self.pre_norm:
            x = self.norm1(tgt)
            tgt = tgt + self.self_attn(x + query_pos, x + query_pos, x)[0]
            x = self.norm2(tgt)
            tgt = tgt + self.multihead_attn(x + query_pos, memory + pos, memory,
                                            key_padding_mask=memory_key_padding_mask)[0]
            return tgt + self.linear2(F.relu(self.linear1(self.norm3(tgt))))
        tgt = self.norm1(tgt + self.self_attn(tgt + query_pos, tgt + query_pos, tgt)[0])
        tgt = self.norm2(tgt + self.multihead_attn(tgt + query_pos, memory + pos, memory,
                                                   key_padding_mask=memory_key_padding_mask)[0])
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class RefTransformer(nn.Module):
    def __init__(self, d, heads, enc_layers, dec_layers, ffn, pre_norm):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(RefEncoderLayer(d, heads, ffn, pre_norm) for _ in range(enc_layers))
        self.encoder.norm = nn.LayerNorm(d) if pre_norm else None
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList(RefDecoderLayer(d, heads, ffn, pre_norm) for _ in range(dec_layers))
        self.decoder.norm = nn.LayerNorm(d)

    def forward(self, src, mask, query_embed, pos_embed):
        bs = src.shape[0]
        src = src.flatten(2).permute(2, 0, 1)  # (N, B, d)
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        query_embed = query_embed.unsqueeze(1).repeat(1, bs, 1)  # (Q, B, d)
        mask = mask.flatten(1)
        memory = src
        for layer in self.encoder.layers:
            memory = layer(memory, mask, pos_embed)
        if self.encoder.norm is not None:
            memory = self.encoder.norm(memory)
        out, intermediate = torch.zeros_like(query_embed), []
        for layer in self.decoder.layers:
            out = layer(out, memory, mask, pos_embed, query_embed)
            intermediate.append(self.decoder.norm(out))
        return torch.stack(intermediate).transpose(1, 2)  # (L, B, Q, d)


def ref_position_embedding(mask, num_pos_feats, temperature=10000):
    """DETR's PositionEmbeddingSine(normalize=True): mask (B, H, W) -> (B, 2 * num_pos_feats, H, W)."""
    not_mask = ~mask
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    eps, scale = 1e-6, 2 * math.pi
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class RefMLP(nn.Module):
    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


class RefDETR(nn.Module):
    """DETR on the last map of `backbone` (a module returning a list of (B, C, H, W) maps)."""

    def __init__(self, backbone, backbone_channels, num_classes, num_queries, d=64, heads=4, enc_layers=2,
                 dec_layers=2, ffn=128, pre_norm=False):
        super().__init__()
        self.backbone = backbone
        self.transformer = RefTransformer(d, heads, enc_layers, dec_layers, ffn, pre_norm)
        self.class_embed = nn.Linear(d, num_classes + 1)
        self.bbox_embed = RefMLP(d, d, 4, 3)
        self.query_embed = nn.Embedding(num_queries, d)
        self.input_proj = nn.Conv2d(backbone_channels, d, kernel_size=1)
        self.d = d
        with torch.no_grad():  # non-trivial norms and biases, so that every tensor matters
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
            for name, p in self.named_parameters():
                if not name.startswith("backbone.") and name.endswith("bias"):
                    p.uniform_(-0.1, 0.1)

    def forward(self, images, pixel_mask):
        """images: (B, 3, H, W) zero-padded; pixel_mask: (B, H, W) True on padding."""
        src = self.backbone(images)[-1]
        mask = F.interpolate(pixel_mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
        pos = ref_position_embedding(mask, self.d // 2)
        hs = self.transformer(self.input_proj(src), mask, self.query_embed.weight, pos)
        outputs_class, outputs_coord = self.class_embed(hs), self.bbox_embed(hs).sigmoid()
        return {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1],
                "aux_outputs": [{"pred_logits": a, "pred_boxes": b}
                                for a, b in zip(outputs_class[:-1], outputs_coord[:-1])]}

    def detr_checkpoint(self):
        """The model in facebookresearch/detr's checkpoint format, with the backbone under `backbone.0.body.`."""
        sd = {("backbone.0.body." + k[len("backbone."):] if k.startswith("backbone.") else k): v.clone()
              for k, v in self.state_dict().items()}
        return {"model": sd, "args": {"hidden_dim": self.d}}


def _cxcywh_to_xyxy(b):
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def _generalized_iou(a, b):
    """(N, 4) x (M, 4) xyxy -> (N, M) GIoU, as DETR's util/box_ops.py."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.max(a[:, None, :2], b[:, :2])
    rb = torch.min(a[:, None, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b - inter
    iou = inter / union
    lt = torch.min(a[:, None, :2], b[:, :2])
    rb = torch.max(a[:, None, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    area = wh[..., 0] * wh[..., 1]
    return iou - (area - union) / area


@torch.no_grad()
def ref_match(outputs, targets, cost_class=1.0, cost_bbox=5.0, cost_giou=2.0):
    """DETR's HungarianMatcher: per image (query indices, target indices)."""
    bs, nq = outputs["pred_logits"].shape[:2]
    out_prob = outputs["pred_logits"].flatten(0, 1).softmax(-1)
    out_bbox = outputs["pred_boxes"].flatten(0, 1)
    tgt_ids = torch.cat([t["labels"] for t in targets])
    tgt_bbox = torch.cat([t["boxes"] for t in targets])
    c = (cost_bbox * torch.cdist(out_bbox, tgt_bbox, p=1) - cost_class * out_prob[:, tgt_ids]
         - cost_giou * _generalized_iou(_cxcywh_to_xyxy(out_bbox), _cxcywh_to_xyxy(tgt_bbox)))
    c = c.view(bs, nq, -1)
    sizes = [len(t["boxes"]) for t in targets]
    indices = [linear_sum_assignment(m[i]) for i, m in enumerate(c.split(sizes, -1))]
    return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in indices]


def ref_set_loss(outputs, targets, num_classes, eos_coef=0.1):
    """DETR's SetCriterion (labels, boxes, cardinality; aux layers suffixed _i): the unweighted loss dict."""
    empty_weight = torch.ones(num_classes + 1)
    empty_weight[-1] = eos_coef
    num_boxes = max(float(sum(len(t["labels"]) for t in targets)), 1.0)

    def single(out):
        indices = ref_match(out, targets)
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        logits = out["pred_logits"]
        target_classes = torch.full(logits.shape[:2], num_classes, dtype=torch.int64)
        target_classes[batch_idx, src_idx] = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, empty_weight)
        src_boxes = out["pred_boxes"][batch_idx, src_idx]
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="none").sum() / num_boxes
        giou = torch.diag(_generalized_iou(_cxcywh_to_xyxy(src_boxes), _cxcywh_to_xyxy(tgt_boxes)))
        with torch.no_grad():  # logged, not optimised: DETR's cardinality_error, of every decoder layer
            predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
            cardinality = F.l1_loss(predicted.float(), torch.tensor([len(t["labels"]) for t in targets]).float())
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num_boxes,
                "cardinality_error": cardinality}

    losses = single(outputs)
    with torch.no_grad():  # logged, not optimised: DETR's class_error, of the last layer only
        indices = ref_match(outputs, targets)
        matched = torch.cat([outputs["pred_logits"][i, src] for i, (src, _) in enumerate(indices)])
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        losses["class_error"] = 100 - (matched.argmax(-1) == labels).float().mean() * 100
    for i, aux in enumerate(outputs["aux_outputs"]):
        losses.update({f"{k}_{i}": v for k, v in single(aux).items()})
    return losses


@torch.no_grad()
def ref_postprocess(outputs, target_sizes):
    """DETR's PostProcess: best non-background class per query, boxes in absolute xyxy of (h, w) target sizes."""
    prob = F.softmax(outputs["pred_logits"], -1)
    scores, labels = prob[..., :-1].max(-1)
    boxes = _cxcywh_to_xyxy(outputs["pred_boxes"])
    img_h, img_w = target_sizes.unbind(1)
    boxes = boxes * torch.stack([img_w, img_h, img_w, img_h], dim=1)[:, None, :]
    return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]
