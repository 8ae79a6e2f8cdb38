"""SetCriterion against hand-computed values; PostProcess scaling."""

import math

import pytest
import torch

from pvt_detr.criterion import SetCriterion
from pvt_detr.matcher import HungarianMatcher
from pvt_detr.postprocess import PostProcess


def _two_image_example():
    # K = 2 classes (+ no-object), Q = 2 queries. Image 0 has one target, image 1 has none.
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]],
                           [[0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]],
                          [[0.5, 0.5, 0.5, 0.5], [0.3, 0.3, 0.2, 0.2]]])
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.2]])},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    return {"pred_logits": logits, "pred_boxes": boxes}, targets


def test_losses_equal_hand_computed_values():
    outputs, targets = _two_image_example()
    criterion = SetCriterion(2, HungarianMatcher(), {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}, eos_coef=0.1)
    losses = criterion(outputs, targets)
    # Query 0 of image 0 matches the target (class 0); all three others are no-object (index 2, weight 0.1).
    lse = lambda v: math.log(sum(math.exp(x) for x in v))  # noqa: E731
    nll = [lse([2, 0, 0]) - 2, lse([0, 0, 1]) - 1, lse([0, 1, 0]) - 0, lse([0, 0, 3]) - 3]
    weights = [1.0, 0.1, 0.1, 0.1]
    expected_ce = sum(w * n for w, n in zip(weights, nll)) / sum(weights)
    assert losses["loss_ce"].item() == pytest.approx(expected_ce, rel=1e-6)
    # L1 between (0.5, 0.5, 0.2, 0.2) and (0.5, 0.5, 0.4, 0.2); one box.
    assert losses["loss_bbox"].item() == pytest.approx(0.2, rel=1e-6)
    # Boxes x 0.4..0.6 vs 0.3..0.7 (same y range 0.4..0.6): IoU = 0.04 / 0.08 = 0.5, hull = union -> GIoU 0.5.
    assert losses["loss_giou"].item() == pytest.approx(0.5, rel=1e-5)
    assert losses["class_error"].item() == pytest.approx(0.0)
    # Predicted objects: image 0 -> 1 (query 0), image 1 -> 1 (query 0 argmax class 1); targets 1 and 0.
    assert losses["cardinality_error"].item() == pytest.approx(0.5)


def test_num_boxes_normalises_box_losses():
    outputs, targets = _two_image_example()
    criterion = SetCriterion(2, HungarianMatcher(), {}, eos_coef=0.1)
    l1 = criterion(outputs, targets, num_boxes=1.0)
    l4 = criterion(outputs, targets, num_boxes=4.0)
    assert l4["loss_bbox"].item() == pytest.approx(l1["loss_bbox"].item() / 4)
    assert l4["loss_ce"].item() == pytest.approx(l1["loss_ce"].item())


def test_the_global_class_weight_sum_makes_the_mean_of_per_process_ce_losses_the_global_batch_loss():
    """Two "processes" holding one image each: given the mean of their class-weight sums (what the distributed engine
    all-reduces and passes as `ce_weight_sum`), the mean of their CE losses (what DDP's gradient averaging optimises)
    is the one-process CE of both images; with each process's own weight sum (DETR's default) it is not."""
    outputs, targets = _two_image_example()
    full = SetCriterion(2, HungarianMatcher(), {}, eos_coef=0.1)(outputs, targets)["loss_ce"].item()
    halves = [({k: v[i:i + 1] for k, v in outputs.items()}, targets[i:i + 1]) for i in range(2)]
    criterion = SetCriterion(2, HungarianMatcher(), {}, eos_coef=0.1)
    queries = outputs["pred_logits"].shape[1]
    weight_sums = [criterion.ce_weight_sum(tgt, queries) for _, tgt in halves]
    assert weight_sums == pytest.approx([1.1, 0.2])  # image 0: a match (1.0) + a no-object (0.1); image 1: two
    assert criterion.ce_weight_sum(targets, queries) == pytest.approx(1.3)
    own = [criterion(out, tgt)["loss_ce"].item() for out, tgt in halves]
    per_process = [criterion(out, tgt, ce_weight_sum=sum(weight_sums) / 2)["loss_ce"].item() for out, tgt in halves]
    assert sum(per_process) / 2 == pytest.approx(full, rel=1e-6)
    assert sum(own) / 2 != pytest.approx(full, rel=1e-3)


def test_postprocess_scales_to_absolute_xyxy():
    logits = torch.tensor([[[0.0, 4.0, 0.0], [5.0, 0.0, 9.0]]])
    boxes = torch.tensor([[[0.5, 0.25, 0.2, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    (res,) = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[200, 400]]))
    torch.testing.assert_close(res["boxes"][0], torch.tensor([160.0, 0.0, 240.0, 100.0]))
    torch.testing.assert_close(res["boxes"][1], torch.tensor([0.0, 0.0, 400.0, 200.0]))
    assert res["labels"].tolist() == [1, 0]
    p = torch.tensor([0.0, 4.0, 0.0]).softmax(0)[1].item()
    assert res["scores"][0].item() == pytest.approx(p)


def test_aux_layers_log_cardinality_and_the_loss_groups_are_selectable_as_in_detr():
    outputs, targets = _two_image_example()
    aux = {"pred_logits": torch.tensor([[[0.0, 0.0, 5.0], [0.0, 0.0, 5.0]], [[0.0, 0.0, 5.0], [0.0, 0.0, 5.0]]]),
           "pred_boxes": outputs["pred_boxes"].clone()}
    outputs["aux_outputs"] = [aux]
    losses = SetCriterion(2, HungarianMatcher(), {})(outputs, targets)
    assert set(losses) == {"loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error",
                           "loss_ce_0", "loss_bbox_0", "loss_giou_0", "cardinality_error_0"}
    # The aux layer predicts no object anywhere: |0 - 1| and |0 - 0| -> 0.5; the last layer: 0.5 (see above).
    assert losses["cardinality_error_0"].item() == pytest.approx(0.5)
    assert losses["loss_bbox_0"].item() == pytest.approx(losses["loss_bbox"].item())

    only_labels = SetCriterion(2, HungarianMatcher(), {}, 0.1, ["labels"])
    assert only_labels.losses == ["labels"]
    assert set(only_labels(outputs, targets)) == {"loss_ce", "class_error", "loss_ce_0"}
    assert only_labels(outputs, targets)["loss_ce"].item() == pytest.approx(losses["loss_ce"].item())
    with pytest.raises(ValueError, match="'masks'.*no segmentation head"):
        SetCriterion(2, HungarianMatcher(), {}, 0.1, ["labels", "masks"])


def test_class_error_of_a_batch_without_targets_is_100_as_in_detr():
    outputs, targets = _two_image_example()
    empty = [targets[1], targets[1]]
    losses = SetCriterion(2, HungarianMatcher(), {})(outputs, empty)
    assert losses["class_error"].item() == 100.0
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    # Every query is no-object (class 2): CE with equal weights 0.1 over the 4 queries.
    lse = lambda v: math.log(sum(math.exp(x) for x in v))  # noqa: E731
    nll = [lse([2, 0, 0]) - 0, lse([0, 0, 1]) - 1, lse([0, 1, 0]) - 0, lse([0, 0, 3]) - 3]
    assert losses["loss_ce"].item() == pytest.approx(sum(nll) / 4, rel=1e-6)
