"""CocoEvaluator against cocoapi's published fake-results table, and on hand-made detections."""

from __future__ import annotations

import contextlib
import io
import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO

from datasets.coco_eval import CocoEvaluator, evaluate_results_file

FAKE_EVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "cocoapi_fake_eval"
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


def test_update_reproduces_the_published_fake_results_table(fake_eval):
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
    evaluator = CocoEvaluator(coco_gt)
    half = len(predictions) // 2
    evaluator.update(dict(list(predictions.items())[:half]))
    evaluator.update(dict(list(predictions.items())[half:]))
    assert len(evaluator.results) == len(results) and len(evaluator.image_ids) == 100
    stats = evaluator.summarize()
    assert [round(s, 3) for s in stats] == PUBLISHED


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
