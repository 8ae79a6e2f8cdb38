"""DETR outputs -> per-image detections in absolute image coordinates (facebookresearch/detr `PostProcess`)."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import box_convert


class PostProcess(nn.Module):
    """Softmax, drop the no-object class, best class per query; boxes to absolute xyxy. No NMS."""

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """outputs: pred_logits (B, Q, K+1), pred_boxes (B, Q, 4) cxcywh in [0, 1]; target_sizes: (B, 2) [h, w].

        Returns per image {'scores': (Q,), 'labels': (Q,), 'boxes': (Q, 4) absolute xyxy}.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(logits) != len(target_sizes) or target_sizes.shape[-1] != 2:
            raise ValueError(f"target_sizes must be (B={len(logits)}, 2), got {tuple(target_sizes.shape)}")
        prob = logits.float().softmax(-1)  # (B, Q, K+1)
        scores, labels = prob[..., :-1].max(-1)  # (B, Q)
        boxes_xyxy = box_convert(boxes.float(), "cxcywh", "xyxy")  # (B, Q, 4)
        h, w = target_sizes.unbind(1)  # (B,)
        scale = torch.stack([w, h, w, h], dim=1).to(boxes_xyxy)  # (B, 4)
        boxes_xyxy = boxes_xyxy * scale[:, None, :]  # (B, Q, 4)
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes_xyxy)]


class SigmoidPostProcess(nn.Module):
    """PostProcess for sigmoid (focal) class heads (Deformable DETR): the `num_select` best (query, class) scores
    per image, boxes to absolute xyxy. Same output format as `PostProcess`."""

    def __init__(self, num_select: int = 100):
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """outputs: pred_logits (B, Q, K) sigmoid logits, pred_boxes (B, Q, 4) cxcywh in [0, 1]; target_sizes:
        (B, 2) [h, w]. Returns per image {'scores': (S,), 'labels': (S,), 'boxes': (S, 4) absolute xyxy}."""
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()  # (B, Q, K), (B, Q, 4)
        if len(logits) != len(target_sizes) or target_sizes.shape[-1] != 2:
            raise ValueError(f"target_sizes must be (B={len(logits)}, 2), got {tuple(target_sizes.shape)}")
        B, Q, K = logits.shape
        scores, index = logits.sigmoid().flatten(1).topk(min(self.num_select, Q * K), dim=1)  # (B, S)
        labels, query = index % K, torch.div(index, K, rounding_mode="floor")  # (B, S)
        boxes = torch.gather(box_convert(boxes, "cxcywh", "xyxy"), 1, query[..., None].expand(-1, -1, 4))  # (B, S, 4)
        h, w = target_sizes.unbind(1)  # (B,)
        boxes = boxes * torch.stack([w, h, w, h], dim=1).to(boxes)[:, None, :]
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]
