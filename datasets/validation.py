"""Checks (and where possible repairs) a COCO detection annotation file before any training starts.

One pass over the raw JSON, no image decoding, before pycocotools sees it (its `COCO()` fails deep inside
`createIndex` on some malformed files). `validate_coco_file` returns the cleaned dict, from which the
dataset builds its `COCO` object, so the file is read only once.

Fatal problems raise `DatasetError` with one line naming the file and the problem: unreadable or non-JSON
file, missing `images` / `annotations` / `categories` lists, duplicate image or category ids, images without
an integer id, a file name or a positive size, annotations pointing at unknown image or category ids.
Fixable problems are fixed and counted in `ValidationReport.summary()`, never silently: boxes that are
non-finite, malformed, of negative or zero size, or outside their image are dropped; boxes running off their
image are clamped to it; missing `area` / `iscrowd` fields and missing or duplicate annotation ids are filled
in. Image files missing from the image folder are listed (the dataset skips them when reading).
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from datasets.errors import DatasetError

# Each fix kind: (verb, singular noun, plural noun); a summary line reads e.g. "dropped 3 zero-area boxes in 2 images".
FIXES = {
    "nonfinite": ("dropped", "box with NaN/inf/non-numeric coordinates", "boxes with NaN/inf/non-numeric coordinates"),
    "malformed": ("dropped", "annotation without a 4-number bbox", "annotations without a 4-number bbox"),
    "negative": ("dropped", "box of negative width or height", "boxes of negative width or height"),
    "zero_area": ("dropped", "zero-area box", "zero-area boxes"),
    "outside": ("dropped", "box outside its image", "boxes outside their image"),
    "clamped": ("clamped", "box running off its image", "boxes running off their image"),
    "tiny": ("kept", "box under 1 pixel (not a training target)", "boxes under 1 pixel (not training targets)"),
    "area": ("filled in", "missing area", "missing areas"),
    "iscrowd": ("set iscrowd=0 on", "annotation without it", "annotations without it"),
    "ann_id": ("renumbered", "missing or duplicate annotation id", "missing or duplicate annotation ids"),
    "cat_name": ("named", "unnamed category after its id", "unnamed categories after their ids"),
}
BOX_FIXES = ("nonfinite", "malformed", "negative", "zero_area", "outside", "clamped", "tiny")
MAX_EXAMPLES = 3


def _count(n: int, singular: str, plural: str) -> str:
    return f"{n} {singular if n == 1 else plural}"


@dataclass
class ValidationReport:
    """What `validate_coco_file` found: sizes, fixes (kind -> image id per fixed annotation), missing image files."""

    ann_file: str
    num_images: int = 0
    num_annotations: int = 0  # kept annotations
    fixes: dict[str, list] = field(default_factory=lambda: defaultdict(list))
    missing_files: list[str] = field(default_factory=list)

    def fix_counts(self) -> dict[str, int]:
        return {kind: len(ids) for kind, ids in self.fixes.items() if ids}

    def summary(self) -> str:
        """One line: file, sizes, then every fix with its count and the number of images it touched."""
        parts = [f"{_count(self.num_images, 'image', 'images')}, "
                 f"{_count(self.num_annotations, 'annotation', 'annotations')}"]
        for kind, (verb, singular, plural) in FIXES.items():
            ids = self.fixes.get(kind)
            if ids:
                where = f" in {_count(len(set(ids)), 'image', 'images')}" if kind in BOX_FIXES else ""
                parts.append(f"{verb} {_count(len(ids), singular, plural)}{where}")
        if self.missing_files:
            examples = ", ".join(self.missing_files[:MAX_EXAMPLES])
            parts.append(f"{_count(len(self.missing_files), 'image file', 'image files')} missing (e.g. {examples}), "
                         "skipped when read")
        return f"{Path(self.ann_file).name}: " + "; ".join(parts)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"annotation file {path} does not exist")
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON (not UTF-8 text: {e.reason} at byte {e.start})") from None
    except (OSError, RecursionError, MemoryError) as e:
        raise DatasetError(f"{path}: cannot read the annotation file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: not a COCO annotation file (top level is a {type(data).__name__}, "
                           "expected an object with images, annotations and categories)")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DatasetError(f"{path}: not a COCO detection file (no '{key}' list)")
        if not isinstance(data[key], list):
            raise DatasetError(f"{path}: '{key}' must be a list, got {type(data[key]).__name__}")
    return data


def _fail_if(problems: list[str], path: Path, what: str) -> None:
    """Raises one line: how many entries have the problem `what`, with the first few as examples."""
    if problems:
        examples = "; ".join(problems[:MAX_EXAMPLES])
        raise DatasetError(f"{path}: {len(problems)} {what} (e.g. {examples})")


def _check_images(images: list, path: Path) -> dict[int, dict]:
    """{image id: image entry}; fatal on entries without an integer id, a file name or a positive size."""
    by_id: dict[int, dict] = {}
    bad, duplicates = [], []
    for i, image in enumerate(images):
        if not isinstance(image, dict):
            bad.append(f"entry {i} is a {type(image).__name__}")
            continue
        image_id = image.get("id")
        width, height = image.get("width"), image.get("height")
        if not _is_int(image_id):
            bad.append(f"entry {i} has id {image_id!r}, expected an integer")
        elif not isinstance(image.get("file_name"), str) or not image["file_name"]:
            bad.append(f"image {image_id} has no file_name")
        elif not (_is_number(width) and _is_number(height) and 0 < width < math.inf and 0 < height < math.inf):
            bad.append(f"image {image_id} has width x height {width!r} x {height!r}")
        elif image_id in by_id:
            duplicates.append(f"image id {image_id} for {by_id[image_id]['file_name']} and {image['file_name']}")
        else:
            by_id[image_id] = image
    _fail_if(bad, path, "invalid image entries (need an integer id, a file_name and a positive width and height)")
    _fail_if(duplicates, path, "duplicate image ids")
    if not by_id:
        raise DatasetError(f"{path}: no images")
    return by_id


def _check_categories(categories: list, path: Path, fixes: dict[str, list]) -> set[int]:
    seen: set[int] = set()
    bad, duplicates = [], []
    for i, category in enumerate(categories):
        if not isinstance(category, dict) or not _is_int(category.get("id")) or category["id"] < 0:
            bad.append(f"entry {i}: {str(category)[:60]}")
        elif category["id"] in seen:
            duplicates.append(f"category id {category['id']}")
        else:
            seen.add(category["id"])
            if not isinstance(category.get("name"), str):
                category["name"] = str(category["id"])
                fixes["cat_name"].append(category["id"])
    _fail_if(bad, path, "invalid category entries (need a non-negative integer id)")
    _fail_if(duplicates, path, "duplicate category ids")
    if not seen:
        raise DatasetError(f"{path}: no categories")
    return seen


def _clean_box(bbox, width: float, height: float) -> tuple[str | None, list[float] | None]:
    """(fix kind or None, cleaned [x, y, w, h] or None if the box must be dropped)."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return "malformed", None
    if not all(_is_number(v) and math.isfinite(v) for v in bbox):
        return "nonfinite", None
    x, y, w, h = (float(v) for v in bbox)
    if w < 0 or h < 0:
        return "negative", None
    if w == 0 or h == 0:
        return "zero_area", None
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
    if x1 <= x0 or y1 <= y0:
        return "outside", None
    if (x0, y0, x1, y1) != (x, y, x + w, y + h):
        return "clamped", [x0, y0, x1 - x0, y1 - y0]
    return None, bbox


def _clean_annotations(annotations: list, images: dict[int, dict], categories: set[int], path: Path,
                       fixes: dict[str, list]) -> list[dict]:
    bad, unknown_image, unknown_category = [], [], []
    kept: list[dict] = []
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            bad.append(f"entry {i} is a {type(ann).__name__}")
            continue
        image_id, category_id = ann.get("image_id"), ann.get("category_id")
        name = f"annotation {ann.get('id', f'#{i}')}"
        if not _is_int(image_id) or image_id not in images:
            unknown_image.append(f"{name} -> image_id {image_id!r}")
            continue
        if not _is_int(category_id) or category_id not in categories:
            unknown_category.append(f"{name} -> category_id {category_id!r}")
            continue
        image = images[image_id]
        kind, bbox = _clean_box(ann.get("bbox"), image["width"], image["height"])
        if kind is not None:
            fixes[kind].append(image_id)
        if bbox is None:
            continue
        ann["bbox"] = bbox
        if bbox[2] < 1 or bbox[3] < 1:
            fixes["tiny"].append(image_id)
        if not (_is_number(ann.get("area")) and math.isfinite(ann["area"]) and ann["area"] >= 0):
            ann["area"] = float(bbox[2] * bbox[3])
            fixes["area"].append(image_id)
        if ann.get("iscrowd") not in (0, 1):
            ann["iscrowd"] = 0
            fixes["iscrowd"].append(image_id)
        kept.append(ann)
    _fail_if(bad, path, "invalid annotation entries")
    _fail_if(unknown_image, path, "annotations refer to image ids not in 'images'")
    _fail_if(unknown_category, path, "annotations refer to category ids not in 'categories'")

    ids = [a.get("id") for a in kept]
    used: set[int] = set()
    next_id = max((i for i in ids if _is_int(i)), default=0) + 1
    for ann in kept:
        if not _is_int(ann.get("id")) or ann["id"] in used:
            ann["id"] = next_id
            next_id += 1
            fixes["ann_id"].append(ann["image_id"])
        used.add(ann["id"])
    return kept


def missing_image_files(img_folder: str | Path, file_names: list[str]) -> list[str]:
    """The file names not present under `img_folder` (one directory listing per folder, no per-file stat)."""
    listings: dict[str, set[str]] = {}
    missing = []
    for name in file_names:
        full = os.path.join(img_folder, name)
        folder, base = os.path.split(full)
        if folder not in listings:
            try:
                listings[folder] = set(os.listdir(folder))
            except OSError:
                listings[folder] = set()
        if base not in listings[folder]:
            missing.append(name)
    return missing


def validate_coco_file(ann_file: str | Path, img_folder: str | Path | None = None,
                       max_missing_fraction: float | None = None) -> tuple[dict, ValidationReport]:
    """Reads a COCO detection annotation file once, checks and repairs it (see the module docstring).

    Returns (cleaned dict, report). With `img_folder`, lists the image files missing from it; more than
    `max_missing_fraction` of the images missing is fatal.
    """
    path = Path(ann_file)
    data = _read_json(path)
    report = ValidationReport(str(path))
    images = _check_images(data["images"], path)
    categories = _check_categories(data["categories"], path, report.fixes)
    data["annotations"] = _clean_annotations(data["annotations"], images, categories, path, report.fixes)
    data["images"] = list(images.values())
    report.num_images, report.num_annotations = len(images), len(data["annotations"])
    if img_folder is not None:
        report.missing_files = missing_image_files(img_folder, [image["file_name"] for image in images.values()])
        fraction = len(report.missing_files) / len(images)
        if max_missing_fraction is not None and fraction > max_missing_fraction:
            raise DatasetError(f"{len(report.missing_files)} of the {len(images)} images listed in {path.name} are "
                               f"missing from {img_folder} (e.g. {', '.join(report.missing_files[:MAX_EXAMPLES])}); "
                               f"more than --max_bad_images {max_missing_fraction}")
    return data, report
