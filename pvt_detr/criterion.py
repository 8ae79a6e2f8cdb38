"""DETR's set-prediction loss (facebookresearch/detr `SetCriterion`): CE + L1 + GIoU over Hungarian matches.

The global batch's normalisers (the number of target boxes, and the class-weight sum of the cross-entropy) are
passed in by the caller (all-reduced across processes by the training engine), so this module never touches
torch.distributed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from pvt_detr.matcher import HungarianMatcher, build_matcher


def box_count(targets: list[dict], num_boxes: float | torch.Tensor | None) -> float | torch.Tensor:
    """The box-loss normaliser: `num_boxes` (the global batch's target count per process, a number or a 0-dim
    tensor) or this batch's, at least 1."""
    if num_boxes is None:
        num_boxes = float(sum(len(t["labels"]) for t in targets))
    if isinstance(num_boxes, torch.Tensor):
        return num_boxes.clamp(min=1.0)
    return max(float(num_boxes), 1.0)


LOSSES = ("labels", "boxes", "cardinality")  # DETR's loss groups, in DETR's order


class SetCriterion(nn.Module):
    """DETR's set loss. Loss groups (`losses`, DETR's names): "labels" -> `loss_ce` (+ the logged `class_error`),
    "boxes" -> `loss_bbox`, `loss_giou`, "cardinality" -> the logged `cardinality_error`. Every group is computed
    for the last decoder layer and, suffixed `_{i}`, for each aux layer (`class_error` for the last layer only)."""

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float],
                 eos_coef: float = 0.1, losses: Sequence[str] = LOSSES):
        super().__init__()
        unknown = [name for name in losses if name not in LOSSES]
        if unknown:
            why = " (pvt-detr has no segmentation head)" if "masks" in unknown else ""
            raise ValueError(f"unknown loss {unknown[0]!r}{why}; SetCriterion computes {', '.join(LOSSES)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = list(losses)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def ce_weight_sum(self, targets: list[dict], num_queries: int) -> float:
        """The class-weight sum that normalises this batch's cross-entropy over `num_queries` queries per image:
        matched queries weigh 1, the others (no object) `eos_coef`. A training engine averages it over processes
        and passes it back as `ce_weight_sum`, so that N processes compute the one-process loss of their batches."""
        matched = sum(min(num_queries, len(t["labels"])) for t in targets)
        return matched + (len(targets) * num_queries - matched) * self.eos_coef

    @staticmethod
    def _src_permutation_idx(indices, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(image index, query index) of every matched prediction, each (M,)."""
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(device)
        src_idx = torch.cat([src for src, _ in indices]).to(device)
        return batch_idx, src_idx

    def _weighted_ce(self, logits: torch.Tensor, target_classes: torch.Tensor,
                     weight_sum: float | torch.Tensor | None) -> torch.Tensor:
        """Cross-entropy of (B, Q, K+1) logits, weighted by `empty_weight`, divided by `weight_sum` (default: this
        batch's sum of the weights, as F.cross_entropy's mean)."""
        per_query = F.cross_entropy(logits.transpose(1, 2).float(), target_classes, self.empty_weight,
                                    reduction="none")  # (B, Q), already multiplied by the class weights
        if weight_sum is None:
            weight_sum = self.empty_weight[target_classes].sum().detach()
        if isinstance(weight_sum, torch.Tensor):
            return per_query.sum() / weight_sum.clamp_min(torch.finfo(torch.float32).tiny)
        return per_query.sum() / max(float(weight_sum), torch.finfo(torch.float32).tiny)

    def _class_loss(self, logits: torch.Tensor, batch_idx: torch.Tensor, src_idx: torch.Tensor,
                    target_classes_o: torch.Tensor, num_boxes: float | torch.Tensor,
                    ce_weight_sum: float | torch.Tensor | None) -> torch.Tensor:
        """Class loss of (B, Q, K+1) logits given the matched (image, query) pairs and their classes."""
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[batch_idx, src_idx] = target_classes_o  # (B, Q)
        return self._weighted_ce(logits, target_classes, ce_weight_sum)

    def _num_predicted(self, logits: torch.Tensor) -> torch.Tensor:
        """(B,) queries per image predicting an object (argmax is not the no-object class)."""
        return (logits.argmax(-1) != self.num_classes).sum(1).float()

    def loss_labels(self, outputs: dict, targets: list[dict], indices, num_boxes: float | torch.Tensor,
                    log: bool = True, ce_weight_sum: float | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`loss_ce`; with log, `class_error`: % of matched queries whose argmax is not their target's class
        (100 when nothing is matched, as in DETR)."""
        logits = outputs["pred_logits"]  # (B, Q, K+1), or (B, Q, K) for sigmoid heads
        batch_idx, src_idx = self._src_permutation_idx(indices, logits.device)
        target_classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])  # (M,)
        losses = {"loss_ce": self._class_loss(logits, batch_idx, src_idx, target_classes_o, num_boxes, ce_weight_sum)}
        if log:
            with torch.no_grad():
                correct = (logits[batch_idx, src_idx].argmax(-1) == target_classes_o).float()  # (M,)
                accuracy = correct.mean() if len(correct) else torch.zeros((), device=logits.device)
                losses["class_error"] = 100.0 - 100.0 * accuracy
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs: dict, targets: list[dict], indices,
                         num_boxes: float) -> dict[str, torch.Tensor]:
        """`cardinality_error`: mean |predicted objects - target boxes| per image (logged, no gradient)."""
        logits = outputs["pred_logits"]  # (B, Q, K+1)
        n_tgt = torch.as_tensor([len(t["labels"]) for t in targets], dtype=torch.float, device=logits.device)
        return {"cardinality_error": F.l1_loss(self._num_predicted(logits), n_tgt)}

    def loss_boxes(self, outputs: dict, targets: list[dict], indices, num_boxes: float) -> dict[str, torch.Tensor]:
        """`loss_bbox` (L1 of cxcywh) and `loss_giou` (1 - GIoU) of the matched boxes, summed, / num_boxes."""
        batch_idx, src_idx = self._src_permutation_idx(indices, outputs["pred_boxes"].device)
        src_boxes = outputs["pred_boxes"][batch_idx, src_idx].float()  # (M, 4) cxcywh
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).float()  # (M, 4) cxcywh
        giou = generalized_box_iou_loss(box_convert(src_boxes, "cxcywh", "xyxy"),
                                        box_convert(tgt_boxes, "cxcywh", "xyxy"), reduction="sum")
        return {"loss_bbox": F.l1_loss(src_boxes, tgt_boxes, reduction="sum") / num_boxes,
                "loss_giou": giou / num_boxes}

    def get_loss(self, loss: str, outputs: dict, targets: list[dict], indices, num_boxes: float,
                 **kwargs) -> dict[str, torch.Tensor]:
        """One loss group by DETR's name: "labels", "boxes" or "cardinality"."""
        groups = {"labels": self.loss_labels, "boxes": self.loss_boxes, "cardinality": self.loss_cardinality}
        return groups[loss](outputs, targets, indices, num_boxes, **kwargs)

    def _losses(self, outputs: dict, targets: list[dict], indices, num_boxes: float | torch.Tensor, log: bool,
                groups: Sequence[str] | None = None,
                ce_weight_sum: float | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The loss groups (default `self.losses`) of one set of predictions, given its matching."""
        losses: dict[str, torch.Tensor] = {}
        for name in self.losses if groups is None else groups:
            kwargs = {"log": log, "ce_weight_sum": ce_weight_sum} if name == "labels" else {}
            losses.update(self.get_loss(name, outputs, targets, indices, num_boxes, **kwargs))
        return losses

    def forward(self, outputs: dict, targets: list[dict], num_boxes: float | torch.Tensor | None = None,
                ce_weight_sum: float | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """outputs: DETR outputs; targets: [{labels (T,) class indices, boxes (T, 4) cxcywh normalised}].

        num_boxes: target boxes per process in the global batch (all processes); default: this batch's. Clamped >= 1.
        ce_weight_sum: the cross-entropy's class-weight sum of the decoder queries per process in the global batch
        (see `ce_weight_sum()`); default: this batch's.
        """
        num_boxes = box_count(targets, num_boxes)
        losses = self._losses(outputs, targets, self.matcher(outputs, targets), num_boxes, log=True,
                              ce_weight_sum=ce_weight_sum)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_losses = self._losses(aux, targets, self.matcher(aux, targets), num_boxes, log=False,
                                      ce_weight_sum=ce_weight_sum)
            losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        return losses


class _SigmoidScoreMatcher(nn.Module):
    """Feeds a matcher log-sigmoid scores, so its softmax class cost ranks queries by their sigmoid probabilities."""

    def __init__(self, matcher: nn.Module):
        super().__init__()
        self.matcher = matcher

    def forward(self, outputs: dict, targets: list[dict]):
        return self.matcher({"pred_logits": F.logsigmoid(outputs["pred_logits"].float()),
                             "pred_boxes": outputs["pred_boxes"]}, targets)


class SigmoidFocalSetCriterion(SetCriterion):
    """Opt-in (`--focal_loss`): Deformable DETR's set loss for sigmoid class heads with K outputs (no no-object
    class): sigmoid focal loss (alpha, gamma) over every query and class, summed and divided by num_boxes, as
    `loss_ce`; L1 + GIoU on matched boxes as in SetCriterion. `eos_coef` is not used."""

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float],
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, losses: Sequence[str] = LOSSES):
        super().__init__(num_classes, _SigmoidScoreMatcher(matcher), weight_dict, eos_coef=1.0, losses=losses)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def ce_weight_sum(self, targets: list[dict], num_queries: int) -> float:
        """0: the focal loss is normalised by the box count alone."""
        return 0.0

    def _class_loss(self, logits: torch.Tensor, batch_idx: torch.Tensor, src_idx: torch.Tensor,
                    target_classes_o: torch.Tensor, num_boxes: float | torch.Tensor,
                    ce_weight_sum: float | torch.Tensor | None) -> torch.Tensor:
        """Sigmoid focal loss of (B, Q, K) logits against one-hot matched classes, summed, / num_boxes."""
        logits = logits.float()
        onehot = torch.zeros_like(logits)  # (B, Q, K)
        onehot[batch_idx, src_idx, target_classes_o] = 1.0
        return sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma,
                                  reduction="sum") / num_boxes

    def _num_predicted(self, logits: torch.Tensor) -> torch.Tensor:
        """(B,) queries per image with a class probability > 0.5."""
        return (logits.max(-1).values > 0).sum(1).float()


def _extra_query_losses(base: SetCriterion) -> list[str]:
    """`base`'s loss groups without "cardinality", for the encoder-token predictions: one per token, their count
    says nothing about how many objects the detector finds."""
    return [name for name in base.losses if name != "cardinality"]


class TwoStageCriterion(nn.Module):
    """Opt-in (`--two_stage`): adds the set loss of the per-token encoder predictions (`enc_outputs`: Hungarian
    matching over the tokens, scored by `base`) to `criterion`'s losses, as `<loss>_enc`. With `repeat` k > 1 the
    matching is one-to-many (H-DETR's hybrid matching): each target is repeated k times, so k tokens learn it."""

    def __init__(self, criterion: nn.Module, base: SetCriterion, repeat: int = 1):
        super().__init__()
        self.criterion = criterion
        self.base = base
        self.repeat = repeat
        self.weight_dict = criterion.weight_dict
        self.num_classes = criterion.num_classes

    def ce_weight_sum(self, targets: list[dict], num_queries: int) -> float:
        return self.criterion.ce_weight_sum(targets, num_queries)

    def forward(self, outputs: dict, targets: list[dict], num_boxes: float | torch.Tensor | None = None,
                ce_weight_sum: float | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """SetCriterion's losses of the decoder outputs, plus `<loss>_enc` of `enc_outputs` (the encoder tokens,
        whose cross-entropy is normalised by this batch's own weight sum)."""
        losses = self.criterion(outputs, targets, num_boxes, ce_weight_sum)
        enc = outputs.get("enc_outputs")
        if enc is None:
            return losses
        num_boxes = box_count(targets, num_boxes) * self.repeat
        if self.repeat > 1:
            targets = [{**t, "labels": t["labels"].repeat(self.repeat), "boxes": t["boxes"].repeat(self.repeat, 1)}
                       for t in targets]
        enc_losses = self.base._losses(enc, targets, self.base.matcher(enc, targets), num_boxes, log=False,
                                       groups=_extra_query_losses(self.base))
        losses.update({f"{k}_enc": v for k, v in enc_losses.items()})
        return losses


def build_criterion(config, num_classes: int) -> nn.Module:
    """DETR's SetCriterion (or the focal variant, with the two-stage encoder loss when asked) from a ModelConfig."""
    weight_dict = {"loss_ce": config.cls_loss_coef, "loss_bbox": config.bbox_loss_coef,
                   "loss_giou": config.giou_loss_coef}
    base_weights = dict(weight_dict)
    if config.aux_loss:
        for i in range(config.dec_layers - 1):
            weight_dict.update({f"{k}_{i}": v for k, v in base_weights.items()})
    matcher = build_matcher(config)
    if config.focal_loss:
        criterion = SigmoidFocalSetCriterion(num_classes, matcher, weight_dict, focal_alpha=config.focal_alpha)
    else:
        criterion = SetCriterion(num_classes, matcher, weight_dict, eos_coef=config.eos_coef)
    if config.two_stage:
        weight_dict.update({f"{k}_enc": v for k, v in base_weights.items()})
        criterion = TwoStageCriterion(criterion, criterion, repeat=config.two_stage_repeat)
    return criterion
