"""Time of the two COCO box evaluators on a generated validation set: `python -m benchmarks.evaluators --boxes 20000`.

Generates (fixed seed) a validation set of COCO-like images holding `--boxes` ground-truth boxes of COCO's 80
categories (small, medium and large, 1 % crowd) and detections for it (most boxes found with jitter, some with the
wrong class, plus false positives), then scores the detections with `datasets.coco_eval.CocoEvaluator` using
pycocotools and faster-coco-eval in turn, `--repeats` times each, alternating. A timed run is what `summarize()`
does in evaluation: load the results, per-image matching, accumulation and the table (for faster-coco-eval also
indexing the ground truth in its own COCO object). Prints both median times, their ratio, and whether the 12 stats
agree (exit status 1 if they do not).

With `--boxes 20000` (2740 images, 20000 boxes, 28004 detections; 3 runs each) on a 2-core AMD EPYC, pycocotools
2.0.11 takes 12.8-19.8 s and faster-coco-eval 1.8.0 2.2-2.5 s (5-9x faster), with identical stats (max difference 0).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import statistics
import sys
import time

import numpy as np
from pycocotools.coco import COCO

from datasets.coco_eval import STAT_NAMES, CocoEvaluator, evaluator_name
from pvt_detr.label_map import COCO_CATEGORIES


def make_validation_set(num_boxes: int, seed: int = 0, boxes_per_image: float = 7.3) -> tuple[dict, list[dict]]:
    """A COCO annotation dict with exactly `num_boxes` boxes (COCO val2017 averages 7.3 per image) and a list of
    COCO result dicts for it."""
    rng = np.random.default_rng(seed)
    num_images = max(1, round(num_boxes / boxes_per_image))
    per_image = rng.multinomial(num_boxes, np.full(num_images, 1 / num_images))  # (I,) boxes per image
    cat_ids = np.array([i for i, _ in COCO_CATEGORIES])
    cat_p = rng.dirichlet(np.full(len(cat_ids), 0.5))  # some categories common, some rare
    images, annotations, results = [], [], []
    for image_id, n in enumerate(per_image.tolist(), start=1):
        w, h = int(rng.integers(480, 641)), int(rng.integers(400, 641))
        images.append({"id": image_id, "width": w, "height": h, "file_name": f"{image_id:012d}.jpg"})
        sides = np.exp(rng.uniform(np.log(6), np.log(0.9 * min(w, h)), size=(n, 2)))  # (n, 2) log-uniform sizes
        xy = rng.uniform(0, 1, size=(n, 2)) * (np.array([w, h]) - sides)  # (n, 2) top-left corners
        labels = rng.choice(cat_ids, size=n, p=cat_p)
        for (x, y), (bw, bh), label in zip(xy.tolist(), sides.tolist(), labels.tolist()):
            crowd = int(rng.uniform() < 0.01)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": crowd})
            if crowd or rng.uniform() > 0.85:
                continue  # a missed box
            jitter = rng.normal(0, 0.08, size=4) * [bw, bh, bw, bh]
            det_label = label if rng.uniform() < 0.9 else int(rng.choice(cat_ids))
            results.append({"image_id": image_id, "category_id": det_label,
                            "bbox": [x + jitter[0], y + jitter[1], max(bw + jitter[2], 1.0), max(bh + jitter[3], 1.0)],
                            "score": float(rng.beta(4, 2))})
        for _ in range(int(rng.poisson(4))):  # false positives, lower scores
            bw, bh = np.exp(rng.uniform(np.log(6), np.log(0.9 * min(w, h)), size=2)).tolist()
            results.append({"image_id": image_id, "category_id": int(rng.choice(cat_ids, p=cat_p)),
                            "bbox": [float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh)), bw, bh],
                            "score": float(rng.beta(2, 4))})
    categories = [{"id": i, "name": n, "supercategory": ""} for i, n in COCO_CATEGORIES]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def coco_from_dict(dataset: dict) -> COCO:
    """A pycocotools COCO over an annotation dict, without its printing."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def time_evaluator(coco_gt: COCO, results: list[dict], evaluator: str) -> tuple[float, list[float]]:
    """Seconds for one `CocoEvaluator.summarize()` with this evaluator, and its 12 stats."""
    ev = CocoEvaluator(coco_gt, evaluator)
    ev.extend(results, coco_gt.getImgIds())
    with contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        stats = ev.summarize()
        seconds = time.perf_counter() - start
    return seconds, stats


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, default=20000, help="ground-truth boxes in the generated set")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per evaluator (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    dataset, results = make_validation_set(args.boxes, args.seed)
    coco_gt = coco_from_dict(dataset)
    print(f"generated set (seed {args.seed}): {len(dataset['images'])} images, {len(dataset['annotations'])} boxes, "
          f"{len(results)} detections; CPU: {_cpu_model()}, Python {platform.python_version()}")
    times: dict[str, list[float]] = {"pycocotools": [], "faster": []}
    stats: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for evaluator in times:  # alternating, so that both see the same machine load
            seconds, stats[evaluator] = time_evaluator(coco_gt, results, evaluator)
            times[evaluator].append(seconds)
    median = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{evaluator_name(k):<24} median {median[k]:7.3f} s  (runs: {', '.join(f'{t:.3f}' for t in v)})")
    print(f"pycocotools / faster-coco-eval: {median['pycocotools'] / median['faster']:.1f}x")
    diff = max(abs(a - b) for a, b in zip(stats["pycocotools"], stats["faster"]))
    agree = diff < 1e-12
    print(" ".join(f"{n} {s:.3f}" for n, s in zip(STAT_NAMES, stats["pycocotools"])) + " (pycocotools)")
    print(f"12 stats {'agree' if agree else 'DIFFER'}: max |pycocotools - faster| = {diff:.1e}")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
