"""CocoEvaluator against cocoapi's published fake-results table and on hand-made detections, with both evaluators
(pycocotools, faster-coco-eval); per-class AP and its table."""

from __future__ import annotations

import contextlib
import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from benchmarks.evaluators import make_validation_set
from datasets.coco_eval import (
    EVALUATORS,
    ClassAP,
    CocoEvaluator,
    evaluate_results_file,
    format_per_class_table,
    per_class_ap,
)
from tests.conftest import SHARED

FAKE_EVAL = SHARED / "data" / "cocoapi_fake_eval"
# cocoapi results/val2014_fake_eval_res.txt, type=bbox
PUBLISHED = [0.505, 0.697, 0.573, 0.586, 0.519, 0.501, 0.387, 0.594, 0.595, 0.640, 0.566, 0.564]


def _quiet_coco(dataset: dict | Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(dataset, Path):
            return COCO(str(dataset))
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
        return coco


@pytest.fixture(scope="module")
def fake_eval():
    if not FAKE_EVAL.is_dir():
        pytest.skip(f"{FAKE_EVAL} not present")
    coco_gt = _quiet_coco(FAKE_EVAL / "instances_val2014_100.json")
    results = json.loads((FAKE_EVAL / "instances_val2014_fakebbox100_results.json").read_text())
    return coco_gt, results


@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_update_reproduces_the_published_fake_results_table(fake_eval, evaluator, capsys):
    coco_gt, results = fake_eval
    per_image = defaultdict(list)
    for r in results:
        per_image[r["image_id"]].append(r)
    predictions = {}
    for image_id in sorted(coco_gt.getImgIds())[:100]:  # one image has no detections at all
        rs = per_image[image_id]
        boxes_xywh = torch.tensor([r["bbox"] for r in rs], dtype=torch.float64).reshape(-1, 4)  # (Q, 4)
        predictions[image_id] = {
            "scores": torch.tensor([r["score"] for r in rs], dtype=torch.float64),
            "labels": torch.tensor([r["category_id"] for r in rs], dtype=torch.int64),
            "boxes": torch.cat([boxes_xywh[:, :2], boxes_xywh[:, :2] + boxes_xywh[:, 2:]], dim=1),  # (Q, 4) xyxy
        }
    coco_evaluator = CocoEvaluator(coco_gt, evaluator)
    half = len(predictions) // 2
    coco_evaluator.update(dict(list(predictions.items())[:half]))
    coco_evaluator.update(dict(list(predictions.items())[half:]))
    assert len(coco_evaluator.results) == len(results) and len(coco_evaluator.image_ids) == 100
    stats = coco_evaluator.summarize()
    assert [round(s, 3) for s in stats] == PUBLISHED
    package = {"pycocotools": "pycocotools 2.", "faster": "faster-coco-eval 1.8."}[evaluator]
    assert capsys.readouterr().out.startswith(f"IoU metric: bbox (evaluator: {package}")


def test_results_file_round_trip_reproduces_the_table(fake_eval, tmp_path):
    coco_gt, results = fake_eval
    stats = evaluate_results_file(coco_gt, FAKE_EVAL / "instances_val2014_fakebbox100_results.json")
    assert [round(s, 3) for s in stats] == PUBLISHED
    evaluator = CocoEvaluator(coco_gt)
    evaluator.extend(results, coco_gt.getImgIds())
    evaluator.write_results(tmp_path / "results.json")
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind
    assert [round(s, 3) for s in evaluate_results_file(coco_gt, tmp_path / "results.json")] == PUBLISHED


def _toy_gt() -> COCO:
    """Two 100 x 100 images; category ids 1 and 7."""
    return _quiet_coco({
        "images": [{"id": 1, "height": 100, "width": 100}, {"id": 2, "height": 100, "width": 100}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 7, "bbox": [50, 20, 30, 60], "area": 1800, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 7, "name": "b"}],
    })


def _prediction(boxes_xyxy, labels, scores) -> dict:
    return {"boxes": torch.tensor(boxes_xyxy, dtype=torch.float32), "labels": torch.tensor(labels),
            "scores": torch.tensor(scores)}


def test_update_converts_xyxy_to_coco_results_and_ignores_repeated_images():
    evaluator = CocoEvaluator(_toy_gt())
    evaluator.update({1: _prediction([[10, 10, 50, 50]], [1], [0.9]), 2: _prediction([], [], [])})
    evaluator.update({1: _prediction([[0, 0, 5, 5]], [7], [0.1])})  # a DistributedSampler duplicate
    assert evaluator.results == [{"image_id": 1, "category_id": 1, "bbox": [10.0, 10.0, 40.0, 40.0], "score":
                                  pytest.approx(0.9)}]
    assert evaluator.image_ids == [1, 2]


def test_perfect_detections_score_one_and_wrong_labels_zero():
    evaluator = CocoEvaluator(_toy_gt())
    evaluator.update({1: _prediction([[10, 10, 50, 50]], [1], [0.9]), 2: _prediction([[50, 20, 80, 80]], [7], [0.8])})
    stats = evaluator.summarize()
    assert stats[0] == pytest.approx(1.0) and stats[1] == pytest.approx(1.0) and stats[8] == pytest.approx(1.0)

    evaluator = CocoEvaluator(_toy_gt())
    evaluator.update({1: _prediction([[10, 10, 50, 50]], [7], [0.9]), 2: _prediction([[50, 20, 80, 80]], [1], [0.8])})
    assert evaluator.summarize()[:3] == [0.0, 0.0, 0.0]

    evaluator = CocoEvaluator(_toy_gt())  # only image 1 evaluated, found: AP 1 although image 2 has a box
    evaluator.update({1: _prediction([[10, 10, 50, 50]], [1], [0.9])})
    assert evaluator.summarize()[0] == pytest.approx(1.0)


def test_no_detections_gives_zeros(capsys):
    evaluator = CocoEvaluator(_toy_gt())
    evaluator.update({1: _prediction([], [], []), 2: _prediction([], [], [])})
    assert evaluator.summarize() == [0.0] * 12
    assert "no detections" in capsys.readouterr().out
    assert CocoEvaluator(_toy_gt()).summarize() == [0.0] * 12


def _stats_and_rows(coco_gt: COCO, results: list[dict], image_ids, evaluator: str):
    ev = CocoEvaluator(coco_gt, evaluator)
    ev.extend(results, image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        stats = ev.summarize()
    return stats, ev.per_class_ap()


def test_faster_gives_pycocotools_stats_and_per_class_ap_on_the_fake_results(fake_eval):
    coco_gt, results = fake_eval
    image_ids = sorted(coco_gt.getImgIds())[:100]
    stats, rows = _stats_and_rows(coco_gt, results, image_ids, "pycocotools")
    fast_stats, fast_rows = _stats_and_rows(coco_gt, results, image_ids, "faster")
    np.testing.assert_allclose(fast_stats, stats, rtol=0, atol=1e-12)
    assert [(r.category_id, r.name, r.num_gt) for r in fast_rows] == [(r.category_id, r.name, r.num_gt) for r in rows]
    np.testing.assert_allclose([r.ap if r.ap is not None else -1 for r in fast_rows],
                               [r.ap if r.ap is not None else -1 for r in rows], rtol=0, atol=1e-12)
    # per-class AP averaged over the classes with ground truth is the table's AP
    with_gt = [r for r in rows if r.ap is not None]
    assert len(rows) == 80 and len(with_gt) == 70 and all(r.num_gt > 0 for r in with_gt)
    assert sum(r.ap for r in with_gt) / len(with_gt) == pytest.approx(stats[0], abs=1e-12)
    assert sum(r.ap50 for r in with_gt) / len(with_gt) == pytest.approx(stats[1], abs=1e-12)
    assert sum(r.num_gt for r in rows) == sum(1 for a in coco_gt.dataset["annotations"]
                                              if a["image_id"] in set(image_ids) and not a["iscrowd"])
    person = next(r for r in rows if r.name == "person")
    assert (person.category_id, person.num_gt) == (1, 250) and round(person.ap, 3) == 0.533


def test_faster_gives_pycocotools_stats_on_a_generated_set():
    dataset, results = make_validation_set(1500, seed=3)
    coco_gt = _quiet_coco(dataset)
    stats, _ = _stats_and_rows(coco_gt, results, coco_gt.getImgIds(), "pycocotools")
    fast_stats, _ = _stats_and_rows(coco_gt, results, coco_gt.getImgIds(), "faster")
    assert 0.1 < stats[0] < 0.9 and all(0 < s < 1 for s in stats)  # a set that exercises every stat
    np.testing.assert_allclose(fast_stats, stats, rtol=0, atol=1e-12)


def _hand_gt() -> COCO:
    """Four 100 x 100 images. Category 1: one box (+ one crowd box); 3: two boxes; 5: one; 7: one; 9: none."""
    boxes = [(1, 1, [10, 10, 40, 40], 0), (1, 1, [60, 60, 20, 20], 1), (2, 7, [50, 20, 30, 60], 0),
             (2, 3, [0, 0, 50, 50], 0), (2, 3, [60, 60, 30, 30], 0), (3, 5, [0, 0, 100, 100], 0),
             (4, 3, [10, 10, 10, 10], 0)]
    return _quiet_coco({
        "images": [{"id": i, "height": 100, "width": 100} for i in (1, 2, 3, 4)],
        "annotations": [{"id": n, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": crowd}
                        for n, (i, c, b, crowd) in enumerate(boxes, start=1)],
        "categories": [{"id": 1, "name": "perfect"}, {"id": 3, "name": "half found"}, {"id": 5, "name": "loose"},
                       {"id": 7, "name": "missed"}, {"id": 9, "name": "no ground truth"}],
    })


HAND_RESULTS = [
    {"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9},  # exact
    {"image_id": 2, "category_id": 7, "bbox": [0, 0, 10, 10], "score": 0.8},  # nowhere near its box
    {"image_id": 2, "category_id": 3, "bbox": [0, 0, 50, 50], "score": 0.7},  # one of two found, the other missed
    {"image_id": 3, "category_id": 5, "bbox": [0, 0, 100, 52], "score": 0.6},  # IoU 0.52: a hit at IoU .50 only
    {"image_id": 3, "category_id": 9, "bbox": [0, 0, 10, 10], "score": 0.5},  # a class without ground truth
]


@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_per_class_ap_hand_checked(evaluator):
    # image 4 (a category-3 box) is not evaluated: it counts neither as ground truth nor as missed
    stats, rows = _stats_and_rows(_hand_gt(), HAND_RESULTS, [1, 2, 3], evaluator)
    half = 51 / 101  # recall 0.5 at precision 1: recall points 0, 0.01, ..., 0.50 of 101
    assert rows == [ClassAP(1, "perfect", pytest.approx(1.0), pytest.approx(1.0), 1),
                    ClassAP(3, "half found", pytest.approx(half), pytest.approx(half), 2),
                    ClassAP(5, "loose", pytest.approx(0.1), pytest.approx(1.0), 1),
                    ClassAP(7, "missed", 0.0, 0.0, 1),
                    ClassAP(9, "no ground truth", None, None, 0)]
    assert stats[0] == pytest.approx((1 + half + 0.1 + 0) / 4)
    assert stats[1] == pytest.approx((1 + half + 1 + 0) / 4)


def test_per_class_table_text():
    ev = CocoEvaluator(_hand_gt())
    ev.extend(HAND_RESULTS, [1, 2, 3])
    with contextlib.redirect_stdout(io.StringIO()):
        ev.summarize()
    lines = ev.per_class_table().splitlines()
    assert lines[0].startswith("per-class box AP (IoU .50:.95 and .50, area all, maxDets 100; pycocotools 2.")
    assert lines[1:] == [
        "   id  name                 AP    AP50  GT boxes",
        "    1  perfect           1.000   1.000         1",
        "    3  half found        0.505   0.505         2",
        "    5  loose             0.100   1.000         1",
        "    7  missed            0.000   0.000         1",
        "    9  no ground truth       -       -         0",
        "       mean of 4         0.401   0.626         5",
    ]
    assert format_per_class_table(per_class_ap(ev.coco_eval), "x") == "\n".join(
        [lines[0].rsplit("; ", 1)[0] + "; x)"] + lines[1:])


def test_per_class_ap_without_detections_and_unknown_evaluator():
    ev = CocoEvaluator(_hand_gt(), "faster")
    ev.extend([], [1, 2, 3, 4])
    with contextlib.redirect_stdout(io.StringIO()):
        assert ev.summarize() == [0.0] * 12
    assert [(r.category_id, r.ap, r.num_gt) for r in ev.per_class_ap()] == [(1, 0.0, 1), (3, 0.0, 3), (5, 0.0, 1),
                                                                             (7, 0.0, 1), (9, None, 0)]
    with pytest.raises(ValueError, match="evaluator must be one of pycocotools, faster, got 'fast'"):
        CocoEvaluator(_hand_gt(), "fast")
