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
