"""Datasets for pvt-detr: COCO (and the synthetic demo, generated in COCO format) with DETR targets.

Importable from the repository root only (it is never installed, so it cannot shadow the Hugging
Face `datasets` package elsewhere).
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Subset

from datasets.coco import CocoDetection, num_classes_from_coco
from datasets.coco_eval import CocoEvaluator, evaluate_results_file
from datasets.collate import collate_fn
from datasets.demo import generate_demo_dataset
from datasets.errors import DatasetError, UnreadableImageError
from datasets.transforms import build_transform

DEFAULT_DEMO_PATH = "data/demo"

__all__ = [
    "CocoDetection",
    "CocoEvaluator",
    "DatasetError",
    "UnreadableImageError",
    "build_dataset",
    "collate_fn",
    "evaluate_results_file",
    "generate_demo_dataset",
    "get_coco_api_from_dataset",
    "num_classes_from_coco",
]


def coco_split_paths(root: str | Path, image_set: str) -> tuple[Path, Path]:
    """(image folder, annotation file) of a COCO-layout split; DatasetError naming what is missing."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"COCO path {root} does not exist or is not a folder")
    images = root / f"{image_set}2017"
    annotations = root / "annotations" / f"instances_{image_set}2017.json"
    if not images.is_dir():
        raise DatasetError(f"COCO image folder {images} does not exist")
    if not annotations.is_file():
        raise DatasetError(f"COCO annotation file {annotations} does not exist")
    return images, annotations


def build_dataset(image_set: str, args) -> CocoDetection:
    """The "train" or "val" split of args.dataset_file ("coco" | "demo") with its transforms; has `.coco`.

    demo: generated into args.coco_path (default data/demo) if not already there, then read as COCO.
    The annotation file is validated first (`datasets.validation`): fatal problems raise DatasetError, fixed
    ones are summarised in one printed line; more than `args.max_bad_images` of the image files missing is fatal.
    """
    if image_set not in ("train", "val"):
        raise ValueError(f"image_set must be 'train' or 'val', got {image_set!r}")
    if args.dataset_file == "demo":
        root = generate_demo_dataset(args.coco_path or DEFAULT_DEMO_PATH, args.demo_train_images,
                                     args.demo_val_images, args.demo_image_size)
    elif args.dataset_file == "coco":
        if not args.coco_path:
            raise DatasetError("--coco_path is required for --dataset_file coco")
        root = args.coco_path
    else:
        raise DatasetError(f"unknown dataset {args.dataset_file!r}; expected 'coco' or 'demo'")
    images, annotations = coco_split_paths(root, image_set)
    return CocoDetection(str(images), str(annotations), transforms=build_transform(image_set, args),
                         max_bad_images=getattr(args, "max_bad_images", None))


def get_coco_api_from_dataset(dataset):
    """The pycocotools COCO object behind a dataset, looking through (nested) `Subset`s."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset.coco
