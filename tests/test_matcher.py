"""HungarianMatcher: batched == per-image, optimal on small problems, empty targets."""

import itertools

import torch
from torchvision.ops import box_convert, generalized_box_iou

from pvt_detr.matcher import HungarianMatcher


def _random_problem(B, Q, sizes, K=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    outputs = {"pred_logits": torch.randn(B, Q, K + 1, generator=g),
               "pred_boxes": torch.rand(B, Q, 4, generator=g) * 0.5 + 0.25}
    targets = [{"labels": torch.randint(0, K, (n,), generator=g),
                "boxes": torch.rand(n, 4, generator=g) * 0.5 + 0.25} for n in sizes]
    return outputs, targets


def _cost(outputs, target, b, matcher):
    prob = outputs["pred_logits"][b].softmax(-1)
    boxes = outputs["pred_boxes"][b]
    giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(target["boxes"], "cxcywh", "xyxy"))
    l1 = torch.cdist(boxes, target["boxes"], p=1)
    return matcher.cost_bbox * l1 - matcher.cost_class * prob[:, target["labels"]] - matcher.cost_giou * giou


def test_batched_equals_per_image():
    matcher = HungarianMatcher()
    outputs, targets = _random_problem(3, 12, [4, 0, 7])
    batched = matcher(outputs, targets)
    for b in range(3):
        single = matcher({k: v[b : b + 1] for k, v in outputs.items()}, [targets[b]])[0]
        assert torch.equal(batched[b][0], single[0]) and torch.equal(batched[b][1], single[1])
    assert len(batched[1][0]) == 0 and len(batched[2][0]) == 7


def test_matches_brute_force_optimum():
    matcher = HungarianMatcher()
    for seed in range(5):
        outputs, targets = _random_problem(1, 5, [3], seed=seed)
        rows, cols = matcher(outputs, targets)[0]
        cost = _cost(outputs, targets[0], 0, matcher)
        got = cost[rows, cols].sum().item()
        best = min(sum(cost[q, t].item() for t, q in enumerate(perm)) for perm in itertools.permutations(range(5), 3))
        assert abs(got - best) < 1e-5
        assert sorted(cols.tolist()) == [0, 1, 2]


def test_all_targets_empty():
    matcher = HungarianMatcher()
    outputs, targets = _random_problem(2, 4, [0, 0])
    for rows, cols in matcher(outputs, targets):
        assert rows.numel() == 0 and cols.numel() == 0 and rows.dtype == torch.int64
