"""COCO box evaluation with pycocotools (the role of facebookresearch/detr `datasets/coco_eval.py`, bbox only).

Detections are kept as COCO result dicts (`{image_id, category_id, bbox [x, y, w, h], score}`), so
results gathered from other processes merge with `extend`, and `write_results` gives the file the
COCO tools read. Each image counts once: a repeated image id (e.g. the copies DistributedSampler
adds to even out the ranks) is ignored after its first occurrence.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import tempfile
from collections.abc import Iterable

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class CocoEvaluator:
    """Collects detections of the evaluated images and scores them with COCOeval (iouType "bbox")."""

    def __init__(self, coco_gt: COCO):
        self.coco_gt = coco_gt
        self.results: list[dict] = []
        self.image_ids: list[int] = []
        self._seen: set[int] = set()
        self.coco_eval: COCOeval | None = None  # the last summarize()'s COCOeval

    def update(self, predictions: dict[int, dict[str, torch.Tensor]]) -> None:
        """predictions: {image_id: {"scores": (Q,), "labels": (Q,), "boxes": (Q, 4) absolute xyxy}}."""
        results = []
        for image_id, pred in predictions.items():
            boxes_xywh = box_convert(pred["boxes"].detach().cpu().reshape(-1, 4), "xyxy", "xywh")  # (Q, 4)
            for box, score, label in zip(boxes_xywh.tolist(), pred["scores"].tolist(), pred["labels"].tolist()):
                results.append({"image_id": int(image_id), "category_id": int(label), "bbox": box, "score": score})
        self.extend(results, [int(i) for i in predictions])

    def extend(self, results: Iterable[dict], image_ids: Iterable[int]) -> None:
        """Adds COCO result dicts and the ids of the images they cover (images without detections included)."""
        new_ids = {int(i) for i in image_ids} - self._seen
        self.results.extend(r for r in results if r["image_id"] in new_ids)
        self.image_ids.extend(sorted(new_ids))
        self._seen |= new_ids

    def summarize(self) -> list[float]:
        """Runs COCOeval on the collected images, prints the standard table and returns its 12 stats."""
        print("IoU metric: bbox")
        if not self.results:
            print("no detections: every AP/AR is 0")
            return [0.0] * len(STAT_NAMES)
        with contextlib.redirect_stdout(io.StringIO()):  # loadRes's chatter; the table below is printed
            coco_dt = self.coco_gt.loadRes(copy.deepcopy(self.results))
        coco_eval = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
        coco_eval.params.imgIds = sorted(self.image_ids)
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval.evaluate()
            coco_eval.accumulate()
        coco_eval.summarize()
        self.coco_eval = coco_eval
        return [float(s) for s in coco_eval.stats]

    def write_results(self, path: str | os.PathLike) -> None:
        """Writes the results JSON (a list of COCO result dicts) atomically: temporary file, then rename."""
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".results-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.results, f)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def evaluate_results_file(coco_gt: COCO, results_json: str | os.PathLike, image_ids: Iterable[int] | None = None):
    """Scores a COCO results file on `image_ids` (default: every ground-truth image); returns the 12 stats."""
    with open(results_json) as f:
        results = json.load(f)
    evaluator = CocoEvaluator(coco_gt)
    evaluator.extend(results, coco_gt.getImgIds() if image_ids is None else image_ids)
    return evaluator.summarize()
