"""DETR's set-prediction loss (facebookresearch/detr `SetCriterion`): CE + L1 + GIoU over Hungarian matches.

The number of target boxes used for normalisation is passed in by the caller (all-reduced across processes by
the training engine), so this module never touches torch.distributed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou_loss

from pvt_detr.matcher import HungarianMatcher


class SetCriterion(nn.Module):
    """Computes `loss_ce`, `loss_bbox`, `loss_giou` (+ `_{i}` per aux layer), `class_error`, `cardinality_error`."""

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float],
                 eos_coef: float = 0.1):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def _losses(self, outputs: dict, targets: list[dict], indices, num_boxes: float, log: bool) -> dict:
        logits = outputs["pred_logits"]  # (B, Q, K+1)
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(logits.device)
        src_idx = torch.cat([src for src, _ in indices]).to(logits.device)  # (M,)
        target_classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])  # (M,)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[batch_idx, src_idx] = target_classes_o  # (B, Q)
        losses = {"loss_ce": F.cross_entropy(logits.transpose(1, 2).float(), target_classes, self.empty_weight)}

        src_boxes = outputs["pred_boxes"][batch_idx, src_idx].float()  # (M, 4) cxcywh
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).float()  # (M, 4) cxcywh
        losses["loss_bbox"] = F.l1_loss(src_boxes, tgt_boxes, reduction="sum") / num_boxes
        losses["loss_giou"] = generalized_box_iou_loss(box_convert(src_boxes, "cxcywh", "xyxy"),
                                                       box_convert(tgt_boxes, "cxcywh", "xyxy"),
                                                       reduction="sum") / num_boxes
        if log:
            with torch.no_grad():
                if len(src_idx):
                    correct = (logits[batch_idx, src_idx].argmax(-1) == target_classes_o).float().mean()
                    losses["class_error"] = 100.0 - 100.0 * correct
                else:
                    losses["class_error"] = torch.tensor(0.0, device=logits.device)
                n_pred = (logits.argmax(-1) != self.num_classes).sum(1).float()  # (B,)
                n_tgt = torch.as_tensor([len(t["labels"]) for t in targets], dtype=torch.float, device=logits.device)
                losses["cardinality_error"] = F.l1_loss(n_pred, n_tgt)
        return losses

    def forward(self, outputs: dict, targets: list[dict], num_boxes: float | None = None) -> dict[str, torch.Tensor]:
        """outputs: DETR outputs; targets: [{labels (T,), boxes (T, 4) cxcywh normalised}].

        num_boxes: number of target boxes in the global batch (all processes); default: this batch's. Clamped >= 1.
        """
        if num_boxes is None:
            num_boxes = float(sum(len(t["labels"]) for t in targets))
        num_boxes = max(float(num_boxes), 1.0)
        for t in targets:
            if len(t["labels"]) and not 0 <= int(t["labels"].min()) <= int(t["labels"].max()) < self.num_classes:
                raise ValueError(f"target labels {t['labels'].tolist()} outside [0, num_classes={self.num_classes}); "
                                 "num_classes must be the max category id + 1")
        losses = self._losses(outputs, targets, self.matcher(outputs, targets), num_boxes, log=True)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_losses = self._losses(aux, targets, self.matcher(aux, targets), num_boxes, log=False)
            losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        return losses


def build_criterion(args, num_classes: int) -> SetCriterion:
    from pvt_detr.matcher import build_matcher

    weight_dict = {"loss_ce": 1.0, "loss_bbox": args.bbox_loss_coef, "loss_giou": args.giou_loss_coef}
    if args.aux_loss:
        base = dict(weight_dict)
        for i in range(args.dec_layers - 1):
            weight_dict.update({f"{k}_{i}": v for k, v in base.items()})
    return SetCriterion(num_classes, build_matcher(args), weight_dict, eos_coef=args.eos_coef)
