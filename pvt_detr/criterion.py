"""DETR's set-prediction loss (facebookresearch/detr `SetCriterion`): CE + L1 + GIoU over Hungarian matches.

The number of target boxes used for normalisation is passed in by the caller (all-reduced across processes by
the training engine), so this module never touches torch.distributed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from pvt_detr.matcher import HungarianMatcher


def box_count(targets: list[dict], num_boxes: float | None) -> float:
    """The box-loss normaliser: `num_boxes` (the global batch's target count) or this batch's, at least 1."""
    if num_boxes is None:
        num_boxes = float(sum(len(t["labels"]) for t in targets))
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
        # Set by a distributed training engine: averages a tensor over processes. The class-weighted CE is then
        # normalised by the mean weight sum over processes rather than this process's own, so that N processes
        # (gradients averaged by DDP) compute exactly the one-process loss of the global batch. Training only.
        self.process_mean: Callable[[torch.Tensor], torch.Tensor] | None = None

    @staticmethod
    def _src_permutation_idx(indices, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(image index, query index) of every matched prediction, each (M,)."""
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(device)
        src_idx = torch.cat([src for src, _ in indices]).to(device)
        return batch_idx, src_idx

    def _weighted_ce(self, logits: torch.Tensor, target_classes: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of (B, Q, K+1) logits, weighted by `empty_weight`, divided by the weight sum."""
        per_query = F.cross_entropy(logits.transpose(1, 2).float(), target_classes, self.empty_weight,
                                    reduction="none")  # (B, Q), already multiplied by the class weights
        weight_sum = self.empty_weight[target_classes].sum().detach()
        if self.process_mean is not None and self.training:
            weight_sum = self.process_mean(weight_sum)
        return per_query.sum() / weight_sum.clamp_min(torch.finfo(torch.float32).tiny)

    def _class_loss(self, logits: torch.Tensor, batch_idx: torch.Tensor, src_idx: torch.Tensor,
                    target_classes_o: torch.Tensor, num_boxes: float) -> torch.Tensor:
        """Class loss of (B, Q, K+1) logits given the matched (image, query) pairs and their classes."""
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[batch_idx, src_idx] = target_classes_o  # (B, Q)
        return self._weighted_ce(logits, target_classes)

    def _num_predicted(self, logits: torch.Tensor) -> torch.Tensor:
        """(B,) queries per image predicting an object (argmax is not the no-object class)."""
        return (logits.argmax(-1) != self.num_classes).sum(1).float()

    def loss_labels(self, outputs: dict, targets: list[dict], indices, num_boxes: float,
                    log: bool = True) -> dict[str, torch.Tensor]:
        """`loss_ce`; with log, `class_error`: % of matched queries whose argmax is not their target's class
        (100 when nothing is matched, as in DETR)."""
        logits = outputs["pred_logits"]  # (B, Q, K+1), or (B, Q, K) for sigmoid heads
        batch_idx, src_idx = self._src_permutation_idx(indices, logits.device)
        target_classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])  # (M,)
        losses = {"loss_ce": self._class_loss(logits, batch_idx, src_idx, target_classes_o, num_boxes)}
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

    def _losses(self, outputs: dict, targets: list[dict], indices, num_boxes: float, log: bool,
                groups: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """The loss groups (default `self.losses`) of one set of predictions, given its matching."""
        losses: dict[str, torch.Tensor] = {}
        for name in self.losses if groups is None else groups:
            kwargs = {"log": log} if name == "labels" else {}
            losses.update(self.get_loss(name, outputs, targets, indices, num_boxes, **kwargs))
        return losses

    def forward(self, outputs: dict, targets: list[dict], num_boxes: float | None = None) -> dict[str, torch.Tensor]:
        """outputs: DETR outputs; targets: [{labels (T,), boxes (T, 4) cxcywh normalised}].

        num_boxes: number of target boxes in the global batch (all processes); default: this batch's. Clamped >= 1.
        """
        num_boxes = box_count(targets, num_boxes)
        for t in targets:
            if len(t["labels"]) and not 0 <= int(t["labels"].min()) <= int(t["labels"].max()) < self.num_classes:
                raise ValueError(f"target labels {t['labels'].tolist()} outside [0, num_classes={self.num_classes}); "
                                 "num_classes must be the max category id + 1")
        losses = self._losses(outputs, targets, self.matcher(outputs, targets), num_boxes, log=True)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_losses = self._losses(aux, targets, self.matcher(aux, targets), num_boxes, log=False)
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

    def _class_loss(self, logits: torch.Tensor, batch_idx: torch.Tensor, src_idx: torch.Tensor,
                    target_classes_o: torch.Tensor, num_boxes: float) -> torch.Tensor:
        """Sigmoid focal loss of (B, Q, K) logits against one-hot matched classes, summed, / num_boxes."""
        logits = logits.float()
        onehot = torch.zeros_like(logits)  # (B, Q, K)
        onehot[batch_idx, src_idx, target_classes_o] = 1.0
        return sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma,
                                  reduction="sum") / num_boxes

    def _num_predicted(self, logits: torch.Tensor) -> torch.Tensor:
        """(B,) queries per image with a class probability > 0.5."""
        return (logits.max(-1).values > 0).sum(1).float()


class GroupSetCriterion(nn.Module):
    """Opt-in (`--num_groups G`): Group DETR's loss. Training outputs hold G groups of `num_queries` queries; each
    group is matched one-to-one and scored by `criterion` on its own; the losses are averaged over groups.
    Outputs with `num_queries` queries (evaluation) go to `criterion` unchanged."""

    def __init__(self, criterion: SetCriterion, num_queries: int, num_groups: int):
        super().__init__()
        self.criterion = criterion
        self.num_queries = num_queries
        self.num_groups = num_groups
        self.weight_dict = criterion.weight_dict
        self.num_classes = criterion.num_classes

    @staticmethod
    def _slice(outputs: dict, part: slice) -> dict:
        out = {k: outputs[k][:, part] for k in ("pred_logits", "pred_boxes")}
        if "aux_outputs" in outputs:
            out["aux_outputs"] = [{k: aux[k][:, part] for k in ("pred_logits", "pred_boxes")}
                                  for aux in outputs["aux_outputs"]]
        return out

    def forward(self, outputs: dict, targets: list[dict], num_boxes: float | None = None) -> dict[str, torch.Tensor]:
        num_q = outputs["pred_logits"].shape[1]
        if num_q == self.num_queries:
            return self.criterion(outputs, targets, num_boxes)
        if num_q != self.num_queries * self.num_groups:
            raise ValueError(f"expected {self.num_queries} or {self.num_queries * self.num_groups} queries, "
                             f"got {num_q}")
        total: dict[str, torch.Tensor] = {}
        for g in range(self.num_groups):
            part = slice(g * self.num_queries, (g + 1) * self.num_queries)
            for k, v in self.criterion(self._slice(outputs, part), targets, num_boxes).items():
                total[k] = total[k] + v if k in total else v
        return {k: v / self.num_groups for k, v in total.items()}


def _extra_query_losses(base: SetCriterion) -> list[str]:
    """`base`'s loss groups without "cardinality", for the denoising and encoder-token predictions: their query
    counts (fixed noised copies, one per token) say nothing about how many objects the detector finds."""
    return [name for name in base.losses if name != "cardinality"]


class DenoisingCriterion(nn.Module):
    """Opt-in (`--dn_groups K`): adds DN-DETR's reconstruction losses of the denoising queries (`dn_outputs`, with
    their fixed (query, target) `indices`) to `criterion`'s losses, as `<loss>_dn` (and `<loss>_dn_<i>` per aux
    layer), scored by `base` (the set criterion's loss terms) and divided by K * num_boxes."""

    def __init__(self, criterion: nn.Module, base: SetCriterion, dn_groups: int):
        super().__init__()
        self.criterion = criterion
        self.base = base
        self.dn_groups = dn_groups
        self.weight_dict = criterion.weight_dict
        self.num_classes = criterion.num_classes

    def forward(self, outputs: dict, targets: list[dict], num_boxes: float | None = None) -> dict[str, torch.Tensor]:
        losses = self.criterion(outputs, targets, num_boxes)
        dn = outputs.get("dn_outputs")
        if dn is None:
            return losses
        num_boxes = box_count(targets, num_boxes) * self.dn_groups
        indices = dn["indices"]
        groups = _extra_query_losses(self.base)
        dn_losses = self.base._losses(dn, targets, indices, num_boxes, log=False, groups=groups)
        losses.update({f"{k}_dn": v for k, v in dn_losses.items()})
        for i, aux in enumerate(dn.get("aux_outputs", [])):
            aux_losses = self.base._losses(aux, targets, indices, num_boxes, log=False, groups=groups)
            losses.update({f"{k}_dn_{i}": v for k, v in aux_losses.items()})
        return losses


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

    def forward(self, outputs: dict, targets: list[dict], num_boxes: float | None = None) -> dict[str, torch.Tensor]:
        losses = self.criterion(outputs, targets, num_boxes)
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


def build_criterion(args, num_classes: int) -> SetCriterion:
    from pvt_detr.matcher import build_matcher

    weight_dict = {"loss_ce": getattr(args, "cls_loss_coef", 1.0), "loss_bbox": args.bbox_loss_coef,
                   "loss_giou": args.giou_loss_coef}
    base_weights = dict(weight_dict)
    if args.aux_loss:
        base = dict(weight_dict)
        for i in range(args.dec_layers - 1):
            weight_dict.update({f"{k}_{i}": v for k, v in base.items()})
    if getattr(args, "focal_loss", False):
        criterion = SigmoidFocalSetCriterion(num_classes, build_matcher(args), weight_dict,
                                             focal_alpha=getattr(args, "focal_alpha", 0.25))
    else:
        criterion = SetCriterion(num_classes, build_matcher(args), weight_dict, eos_coef=args.eos_coef)
    base = criterion
    num_groups = getattr(args, "num_groups", 1)
    if num_groups > 1:
        criterion = GroupSetCriterion(criterion, args.num_queries, num_groups)
    dn_groups = getattr(args, "dn_groups", 0)
    if dn_groups > 0:
        for k, v in list(weight_dict.items()):
            head, _, layer = k.rpartition("_")
            weight_dict[f"{head}_dn_{layer}" if layer.isdigit() else f"{k}_dn"] = v  # loss_ce_0 -> loss_ce_dn_0
        criterion = DenoisingCriterion(criterion, base, dn_groups)
    if getattr(args, "two_stage", False):
        weight_dict.update({f"{k}_enc": v for k, v in base_weights.items()})
        criterion = TwoStageCriterion(criterion, base, repeat=getattr(args, "two_stage_repeat", 1))
    return criterion
