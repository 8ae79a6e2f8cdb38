"""Synthetic COCO-format demo dataset: coloured shapes on textured backgrounds, written as real JPEGs.

Layout (what `build_dataset` expects of COCO): `root/{train,val}2017/*.jpg` and
`root/annotations/instances_{train,val}2017.json`. Categories have non-contiguous ids (1 rectangle,
3 ellipse, 7 triangle) so code that assumes contiguous labels fails on the demo as it would on COCO.
Each image holds 1-6 objects (fewer more often: P(n) falls from 30 % for one object to 6 % for six, mean 2.65)
with sides of 15-60 % of the image, random colours contrasting with
what lies beneath, placed so that no object loses more than half of its pixels to later ones.
Boxes are exactly the extent of each object's visible pixels. Every image comes from its own seeded
generator, so the output depends only on (seed, split, index) and image size.

A `.complete` marker (holding the generation parameters) is written last: a folder with a matching
marker is reused, one with a `.partial` marker or different parameters is regenerated. Not safe
for several processes generating into one folder at once: generate on one rank first.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from datasets.errors import DatasetError

CATEGORIES = ({"id": 1, "name": "rectangle"}, {"id": 3, "name": "ellipse"}, {"id": 7, "name": "triangle"})
SPLIT_CODES = {"train": 0, "val": 1}  # part of each image's seed
MAX_OBJECTS = 6
NUM_OBJECTS_PROBS = (0.30, 0.24, 0.18, 0.13, 0.09, 0.06)  # P(1 object), ..., P(6 objects): skewed toward fewer
SIZE_RANGE = (0.15, 0.60)  # object width/height as a fraction of the image side
MAX_ASPECT = 1.8  # width / height within [1 / MAX_ASPECT, MAX_ASPECT] before clipping to SIZE_RANGE
MAX_OCCLUDED = 0.5  # a placement is rejected if it hides more than this fraction of an earlier object
PLACEMENT_TRIES = 20
MIN_CONTRAST = 110.0  # RGB distance of an object's colour from the background mean beneath it
MIN_OBJECT_CONTRAST = 80.0  # ... and from the colour of any object it overlaps
BACKGROUND_NOISE, OBJECT_NOISE = 8.0, 5.0  # per-pixel Gaussian noise (std, grey levels)
JPEG_QUALITY = 90
FORMAT_VERSION = 2  # bump when the rendering changes, so old folders are regenerated
MARKER, IN_PROGRESS = ".complete", ".partial"


@dataclass
class DemoObject:
    """One drawn shape: its category, colour, visible pixels (H, W) bool and pixel count before occlusion."""

    category_id: int
    colour: tuple[int, int, int]
    mask: np.ndarray
    full_area: int

    def bbox_xywh(self) -> list[int]:
        """COCO box [x, y, w, h] exactly around the visible pixels (pixel i spans [i, i + 1))."""
        cols = np.flatnonzero(self.mask.any(axis=0))
        rows = np.flatnonzero(self.mask.any(axis=1))
        return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth colour blobs (a bilinearly upsampled 4 x 4 grid); (size, size, 3) float."""
    grid = rng.uniform(40, 215, size=3) + rng.uniform(-45, 45, size=(4, 4, 3))  # (4, 4, 3)
    small = Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8))
    return np.asarray(small.resize((size, size), Image.BILINEAR), dtype=np.float32)  # (size, size, 3)


def _shape_mask(rng: np.random.Generator, category_id: int, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """(size, size) bool mask of a shape drawn inside box = (x0, y0, x1, y1), inclusive pixel corners."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = box
    if category_id == 1:
        draw.rectangle(box, fill=1)
    elif category_id == 3:
        draw.ellipse(box, fill=1)
    else:  # triangle with its apex on a random side of the box, anywhere along that side
        t = rng.uniform(0.15, 0.85)
        apex_x, apex_y = round(x0 + t * (x1 - x0)), round(y0 + t * (y1 - y0))
        side = int(rng.integers(4))
        corners = [
            [(apex_x, y0), (x0, y1), (x1, y1)],  # apex up
            [(apex_x, y1), (x0, y0), (x1, y0)],  # apex down
            [(x0, apex_y), (x1, y0), (x1, y1)],  # apex left
            [(x1, apex_y), (x0, y0), (x0, y1)],  # apex right
        ][side]
        draw.polygon(corners, fill=1)
    return np.asarray(canvas, dtype=bool)


def _pick_colour(rng: np.random.Generator, under: np.ndarray, neighbours: list[np.ndarray]) -> np.ndarray:
    """A random colour far from `under` (mean background colour) and from the overlapped objects' colours."""
    best, best_margin = None, -math.inf
    for _ in range(10):
        colour = rng.integers(0, 256, size=3).astype(np.float32)
        margin = min(
            [np.linalg.norm(colour - under) - MIN_CONTRAST]
            + [np.linalg.norm(colour - c) - MIN_OBJECT_CONTRAST for c in neighbours]
        )
        if margin >= 0:
            return colour
        if margin > best_margin:
            best, best_margin = colour, margin
    return best


def render_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[DemoObject]]:
    """One synthetic image (size, size, 3) uint8 and its objects (visible masks, in drawing order)."""
    pixels = _background(rng, size) + rng.normal(0.0, BACKGROUND_NOISE, size=(size, size, 3))  # (size, size, 3)
    objects: list[DemoObject] = []
    lo, hi = math.ceil(SIZE_RANGE[0] * size), math.floor(SIZE_RANGE[1] * size)
    for _ in range(1 + int(rng.choice(MAX_OBJECTS, p=NUM_OBJECTS_PROBS))):
        for _ in range(PLACEMENT_TRIES):
            category_id = CATEGORIES[int(rng.integers(len(CATEGORIES)))]["id"]
            side = rng.uniform(*SIZE_RANGE) * size
            aspect = math.exp(rng.uniform(-math.log(MAX_ASPECT), math.log(MAX_ASPECT)))
            w = int(np.clip(round(side * math.sqrt(aspect)), lo, hi))
            h = int(np.clip(round(side / math.sqrt(aspect)), lo, hi))
            x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            mask = _shape_mask(rng, category_id, (x0, y0, x0 + w - 1, y0 + h - 1), size)
            still_visible = [obj.mask & ~mask for obj in objects]
            if all(v.sum() >= (1 - MAX_OCCLUDED) * obj.full_area for v, obj in zip(still_visible, objects)):
                break
        else:
            continue  # no acceptable placement: this image gets one object fewer
        neighbours = [np.asarray(obj.colour, np.float32) for obj in objects if (obj.mask & mask).any()]
        colour = _pick_colour(rng, pixels[mask].mean(axis=0), neighbours)
        pixels[mask] = colour + rng.normal(0.0, OBJECT_NOISE, size=(int(mask.sum()), 3))  # (A, 3)
        for obj, visible in zip(objects, still_visible):
            obj.mask = visible
        objects.append(DemoObject(category_id, tuple(int(c) for c in colour), mask, int(mask.sum())))
    return np.clip(pixels, 0, 255).round().astype(np.uint8), objects


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _write_split(root: Path, split: str, count: int, image_size: int, seed: int) -> None:
    """Renders `count` images into root/{split}2017 and writes root/annotations/instances_{split}2017.json."""
    folder = root / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        image_id = index + 1
        pixels, objects = render_scene(np.random.default_rng([seed, SPLIT_CODES[split], index]), image_size)
        file_name = f"{image_id:012d}.jpg"
        # 4:4:4 chroma: colours of small shapes do not bleed into the background
        Image.fromarray(pixels).save(folder / file_name, quality=JPEG_QUALITY, subsampling=0)
        images.append({"id": image_id, "file_name": file_name, "height": image_size, "width": image_size})
        for obj in objects:
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": obj.category_id,
                "bbox": obj.bbox_xywh(),
                "area": int(obj.mask.sum()),
                "iscrowd": 0,
            })
    categories = [dict(c, supercategory="shape") for c in CATEGORIES]
    info = {"description": f"pvt-detr synthetic shapes demo ({split})", "version": str(FORMAT_VERSION)}
    coco = {"info": info, "images": images, "annotations": annotations, "categories": categories}
    _write_json_atomic(root / "annotations" / f"instances_{split}2017.json", coco)


def is_complete(root: Path, params: dict) -> bool:
    """True if root holds a finished dataset generated with exactly `params`."""
    marker = root / MARKER
    if not marker.is_file() or json.loads(marker.read_text()) != params:
        return False
    for split in SPLIT_CODES:
        folder = root / f"{split}2017"
        if not (root / "annotations" / f"instances_{split}2017.json").is_file() or not folder.is_dir():
            return False
        if sum(1 for _ in folder.glob("*.jpg")) != params[f"num_{split}"]:
            return False
    return True


def _claim(root: Path) -> None:
    """Makes root an empty demo folder marked in progress; refuses folders the generator did not create."""
    ours = (root / MARKER).exists() or (root / IN_PROGRESS).exists()
    if root.exists() and any(root.iterdir()) and not ours:
        raise DatasetError(f"{root} is not empty and is not a generated demo dataset (no {MARKER}); use a new path")
    root.mkdir(parents=True, exist_ok=True)
    (root / IN_PROGRESS).touch()
    (root / MARKER).unlink(missing_ok=True)
    for name in ("train2017", "val2017", "annotations"):
        shutil.rmtree(root / name, ignore_errors=True)
    (root / "annotations").mkdir()


def generate_demo_dataset(
    root: str | os.PathLike, num_train: int, num_val: int, image_size: int, seed: int = 0
) -> Path:
    """Writes the demo dataset into root unless a complete one with the same parameters is there; returns root."""
    if num_train < 1 or num_val < 1 or image_size < 32:
        raise ValueError(f"need num_train, num_val >= 1 and image_size >= 32, got {num_train}, {num_val}, {image_size}")
    root = Path(root)
    params = {"format_version": FORMAT_VERSION, "num_train": num_train, "num_val": num_val,
              "image_size": image_size, "seed": seed}
    if is_complete(root, params):
        return root
    print(f"Generating the demo dataset in {root} ({num_train} train + {num_val} val images of {image_size} px)")
    _claim(root)
    _write_split(root, "train", num_train, image_size, seed)
    _write_split(root, "val", num_val, image_size, seed)
    _write_json_atomic(root / MARKER, params)
    (root / IN_PROGRESS).unlink()
    return root
