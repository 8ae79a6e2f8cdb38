"""COCO box evaluation (the role of facebookresearch/detr `datasets/coco_eval.py`, bbox only) and per-class AP.

Detections are kept as COCO result dicts (`{image_id, category_id, bbox [x, y, w, h], score}`), so
results gathered from other processes merge with `extend`, and `write_results` gives the file the
COCO tools read. Each image counts once: a repeated image id (e.g. the copies DistributedSampler
adds to even out the ranks) is ignored after its first occurrence.

Two evaluators compute the same table: pycocotools' COCOeval (the reference, default) and faster-coco-eval's
COCOeval_faster (the same algorithm with the per-image matching and accumulation in C++). Every printed table
names the one that produced it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
EVALUATORS = ("pycocotools", "faster")  # --evaluator choices; pycocotools is the reference
_PACKAGES = {"pycocotools": "pycocotools", "faster": "faster-coco-eval"}


def evaluator_name(evaluator: str) -> str:
    """'pycocotools 2.0.11' / 'faster-coco-eval 1.8.0': the package and version that computes the tables."""
    package = _PACKAGES[evaluator]
    try:
        return f"{package} {metadata.version(package)}"
    except metadata.PackageNotFoundError:
        return package


class CocoEvaluator:
    """Collects detections of the evaluated images and scores them with COCOeval (iouType "bbox").

    evaluator: "pycocotools" (the reference) or "faster" (faster-coco-eval's COCOeval_faster, same stats).
    """

    def __init__(self, coco_gt: COCO, evaluator: str = "pycocotools"):
        if evaluator not in EVALUATORS:
            raise ValueError(f"evaluator must be one of {', '.join(EVALUATORS)}, got {evaluator!r}")
        self.coco_gt = coco_gt
        self.evaluator = evaluator
        self.results: list[dict] = []
        self.image_ids: list[int] = []
        self._seen: set[int] = set()
        self._faster_gt = None  # coco_gt as a faster_coco_eval COCO, built on first use
        self.coco_eval = None  # the last summarize()'s COCOeval (pycocotools or faster_coco_eval)

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

    @property
    def name(self) -> str:
        """The evaluator package and version, as printed with its tables."""
        return evaluator_name(self.evaluator)

    def summarize(self) -> list[float]:
        """Runs COCOeval on the collected images, prints the standard table and returns its 12 stats."""
        print(f"IoU metric: bbox (evaluator: {self.name})")
        self.coco_eval = None
        if not self.results:
            print("no detections: every AP/AR is 0")
            return [0.0] * len(STAT_NAMES)
        coco_eval = self._coco_eval()
        coco_eval.params.imgIds = sorted(self.image_ids)
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval.evaluate()
            coco_eval.accumulate()
        coco_eval.summarize()
        self.coco_eval = coco_eval
        return [float(s) for s in coco_eval.stats]

    def _coco_eval(self):
        """A COCOeval of the chosen evaluator over the collected results (not yet run)."""
        results = copy.deepcopy(self.results)  # loadRes adds keys to the dicts
        if self.evaluator == "pycocotools":
            with contextlib.redirect_stdout(io.StringIO()):  # loadRes's chatter; the table is printed
                coco_dt = self.coco_gt.loadRes(results)
            return COCOeval(self.coco_gt, coco_dt, iouType="bbox")
        from faster_coco_eval import COCO as FasterCOCO
        from faster_coco_eval import COCOeval_faster

        if self._faster_gt is None:  # its own index over copies of the annotations (evaluation marks them)
            dataset = dict(self.coco_gt.dataset)
            dataset["annotations"] = [dict(a) for a in dataset.get("annotations", [])]
            self._faster_gt = FasterCOCO(dataset)
        coco_dt = self._faster_gt.loadRes(results)
        return COCOeval_faster(self._faster_gt, coco_dt, iouType="bbox", print_function=print)

    def per_class_ap(self) -> list[ClassAP]:
        """Per-category AP, AP50 and GT boxes of the last `summarize` (every AP 0 if there were no detections)."""
        if self.coco_eval is not None:
            return per_class_ap(self.coco_eval)
        counts = _gt_counts(self.coco_gt, self.image_ids)
        return [ClassAP(c["id"], c["name"], 0.0 if counts[c["id"]] else None, 0.0 if counts[c["id"]] else None,
                        counts[c["id"]]) for c in self.coco_gt.loadCats(sorted(self.coco_gt.getCatIds()))]

    def per_class_table(self) -> str:
        """`format_per_class_table` of `per_class_ap`, naming this evaluator."""
        return format_per_class_table(self.per_class_ap(), self.name)

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


def evaluate_results_file(coco_gt: COCO, results_json: str | os.PathLike, image_ids: Iterable[int] | None = None,
                          evaluator: str = "pycocotools"):
    """Scores a COCO results file on `image_ids` (default: every ground-truth image); returns the 12 stats."""
    with open(results_json) as f:
        results = json.load(f)
    evaluator = CocoEvaluator(coco_gt, evaluator)
    evaluator.extend(results, coco_gt.getImgIds() if image_ids is None else image_ids)
    return evaluator.summarize()


@dataclass(frozen=True)
class ClassAP:
    """One category's box AP. ap: IoU .50:.95, area all, 100 detections per image; ap50: IoU .50; both None
    when the evaluated images hold no ground truth of it. num_gt: its non-crowd ground-truth boxes there."""

    category_id: int
    name: str
    ap: float | None
    ap50: float | None
    num_gt: int


def _gt_counts(coco_gt, image_ids: Iterable[int]) -> Counter:
    """Category id -> non-crowd ground-truth boxes in the given images."""
    images = {int(i) for i in image_ids}
    return Counter(a["category_id"] for a in coco_gt.dataset.get("annotations", [])
                   if a["image_id"] in images and not a.get("iscrowd", 0))


def per_class_ap(coco_eval) -> list[ClassAP]:
    """Per-category rows from a finished (evaluated and accumulated) pycocotools or faster-coco-eval COCOeval.

    Reads `eval['precision']` (T IoU thresholds, R recall points, K categories, A areas, M max-detection limits);
    -1 marks a category without ground truth. The mean of `ap` over categories with ground truth is the table's AP.
    """
    p = coco_eval.params
    precision = coco_eval.eval["precision"]  # (T, R, K, A, M)
    area, max_dets = p.areaRngLbl.index("all"), list(p.maxDets).index(100)
    t50 = int(np.argmin(np.abs(np.asarray(p.iouThrs) - 0.5)))
    counts = _gt_counts(coco_eval.cocoGt, p.imgIds)
    rows = []
    for k, cat_id in enumerate(p.catIds):
        cat_id = int(cat_id)
        s = precision[:, :, k, area, max_dets]  # (T, R)
        has_gt = bool((s > -1).any())
        ap = float(s[s > -1].mean()) if has_gt else None
        ap50 = float(s[t50][s[t50] > -1].mean()) if has_gt else None
        name = coco_eval.cocoGt.cats.get(cat_id, {}).get("name", str(cat_id))
        rows.append(ClassAP(cat_id, name, ap, ap50, counts[cat_id]))
    return rows


def format_per_class_table(rows: list[ClassAP], evaluator: str) -> str:
    """A fixed-width text table: category id, name, AP, AP50, GT boxes ('-' for categories without ground truth),
    a title naming the evaluator, and the mean over categories with ground truth."""
    with_gt = [r for r in rows if r.ap is not None]
    width = max([4, len(f"mean of {len(with_gt)}"), *(len(r.name) for r in rows)])
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    lines = [f"per-class box AP (IoU .50:.95 and .50, area all, maxDets 100; {evaluator})",
             f"{'id':>5}  {'name':<{width}}  {'AP':>6}  {'AP50':>6}  {'GT boxes':>8}"]
    lines += [f"{r.category_id:>5}  {r.name:<{width}}  {fmt(r.ap):>6}  {fmt(r.ap50):>6}  {r.num_gt:>8}" for r in rows]
    if with_gt:
        mean_ap = sum(r.ap for r in with_gt) / len(with_gt)
        mean_ap50 = sum(r.ap50 for r in with_gt) / len(with_gt)
        lines.append(f"{'':>5}  {f'mean of {len(with_gt)}':<{width}}  {mean_ap:>6.3f}  {mean_ap50:>6.3f}  "
                     f"{sum(r.num_gt for r in rows):>8}")
    return "\n".join(lines)
