"""Hungarian matching between predictions and targets (facebookresearch/detr `HungarianMatcher`)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou


class NonFinitePredictionError(FloatingPointError):
    """Predictions with NaN or inf values reached the matcher (e.g. diverged weights); the message is one line."""


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising cost_class * (-p[class]) + cost_bbox * L1 + cost_giou * (-GIoU)."""

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """outputs: pred_logits (B, Q, K+1), pred_boxes (B, Q, 4) cxcywh; targets: [{labels (T,), boxes (T, 4)}].

        Returns per image (query indices, target indices), int64 tensors of length min(Q, T).
        """
        B, Q = outputs["pred_logits"].shape[:2]
        sizes = [len(t["boxes"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in range(B)]
        prob = outputs["pred_logits"].flatten(0, 1).float().softmax(-1)  # (B*Q, K+1)
        boxes = outputs["pred_boxes"].flatten(0, 1).float()  # (B*Q, 4)
        tgt_ids = torch.cat([t["labels"] for t in targets])  # (T_all,)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).float()  # (T_all, 4)

        cost = self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)  # (B*Q, T_all)
        cost -= self.cost_class * prob[:, tgt_ids]
        cost -= self.cost_giou * generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                                     box_convert(tgt_boxes, "cxcywh", "xyxy"))
        cost = cost.view(B, Q, -1).cpu().numpy()  # (B, Q, T_all); numpy: no more tiny (threaded) torch ops
        if not np.isfinite(cost).all():
            raise NonFinitePredictionError("predictions (NaN or inf in the predicted classes or boxes)")

        indices, start = [], 0
        for i, n in enumerate(sizes):  # image i: its queries against its own targets, (Q, T_i)
            rows, cols = linear_sum_assignment(cost[i, :, start : start + n])
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
            start += n
        return indices


def build_matcher(config) -> HungarianMatcher:
    """The matcher of a ModelConfig (its set_cost_* fields)."""
    return HungarianMatcher(config.set_cost_class, config.set_cost_bbox, config.set_cost_giou)
