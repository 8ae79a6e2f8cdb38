"""Detecting objects with a trained checkpoint: `Detector.from_checkpoint(path).predict(images)`.

Images go through exactly what `main.py --eval` does with a validation image, so the API predicts what the
evaluation scored:
1. decoding (file paths): 8-bit RGB in the displayed orientation (EXIF orientation applied), 16-bit images
   scaled to 8 bits, as `datasets/coco.py`'s `load_rgb` decodes dataset images;
2. `pvt_detr.preprocess.build_eval_transform(config["test_size"], config["max_size"])` of the checkpoint's config;
3. batching as `datasets.collate_fn`: zero padding at the bottom/right to multiples of 32 with a padding mask
   (predictions do not depend on the batch, see README);
4. the model, rebuilt from the checkpoint's config with `build_model`, and the post-processor `build_model`
   pairs with it; class outputs become category ids and names through the checkpoint's label map (the training
   dataset's categories, `pvt_detr.label_map`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from pvt_detr.checkpoints import CheckpointError, checkpoint_label_map, load_detr_checkpoint, load_state_file
from pvt_detr.config import ModelConfig, stored_config
from pvt_detr.detr import build_model
from pvt_detr.image_io import ImageReadError, read_image, to_rgb  # noqa: F401  (ImageReadError: part of this API)
from pvt_detr.label_map import LabelMap
from pvt_detr.nested_tensor import nested_tensor_from_tensor_list
from pvt_detr.preprocess import build_eval_transform


def load_image(path: str | Path) -> Image.Image:
    """Decodes an image file as 8-bit RGB in its displayed orientation (EXIF orientation applied).

    A corrupt EXIF block leaves the stored frame. Raises ImageReadError for a missing, truncated or corrupt file.
    """
    return read_image(path)


def _array_to_pil(array: np.ndarray) -> Image.Image:
    """(H, W), (H, W, 1|3|4) uint8, or float in [0, 1] -> RGB PIL image (alpha dropped)."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]  # (H, W)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"expected an (H, W), (H, W, 3) or (H, W, 4) image array, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        array = np.clip(np.rint(array.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"expected uint8 or float (in [0, 1]) pixels, got {array.dtype}")
    return to_rgb(Image.fromarray(np.ascontiguousarray(array)))


def as_pil(image) -> Image.Image:
    """One input image -> RGB PIL image, the form the evaluation transform receives.

    path (str / Path; decoded by `load_image`, EXIF applied), PIL image (used as given), numpy array (H, W[, C]) or
    tensor (C, H, W) / (H, W); uint8, or float in [0, 1] (rounded to 8 bits like a decoded file).
    """
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, torch.Tensor):
        pixels = image.detach().cpu()
        if pixels.dim() == 3:
            pixels = pixels.permute(1, 2, 0)  # (H, W, C)
        return _array_to_pil(pixels.numpy())
    if isinstance(image, np.ndarray):
        return _array_to_pil(image)
    raise TypeError(f"unsupported image type {type(image).__name__}: use a path, PIL image, numpy array or tensor")


def _is_batch(images) -> bool:
    if isinstance(images, (list, tuple)):
        return True
    return isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4


@dataclass
class Detections:
    """Detections of one image, in the pixels of that image as given (after EXIF orientation for files)."""

    boxes: torch.Tensor  # (N, 4) absolute xyxy
    scores: torch.Tensor  # (N,)
    labels: torch.Tensor  # (N,) int64 category ids of the training dataset
    names: list[str]  # (N,) category names
    image_size: tuple[int, int]  # (h, w) of the input image

    def __len__(self) -> int:
        return len(self.scores)

    def to_coco(self, **fields) -> list[dict]:
        """COCO results rows {**fields, category_id, category_name, bbox [x, y, w, h], score}."""
        rows = []
        for (x0, y0, x1, y1), score, label, name in zip(self.boxes.tolist(), self.scores.tolist(),
                                                        self.labels.tolist(), self.names):
            rows.append({**fields, "category_id": int(label), "category_name": name,
                         "bbox": [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)], "score": round(score, 5)})
        return rows


def select_device(name: str = "auto") -> torch.device:
    """"auto" (CUDA if available), "cpu" or "cuda"; ValueError if CUDA is asked for but not available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if not name.startswith(("cpu", "cuda")):
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


class Detector:
    """A trained PVT-DETR with its evaluation preprocessing, post-processing and category names.

    model: a DETR (eval mode); postprocessor: its `build_model` post-processor; test_size / max_size: the
    evaluation resize (default: `ModelConfig`'s); label_map: the (category id, name) of each class output (default:
    DETR's layout, row = id, named by `categories` {id: name} if given); compile: run the model through
    `torch.compile` (with freezing on the CPU: weights become constants of the compiled graph), which compiles on
    the first batch of each new shape.
    """

    def __init__(self, model: nn.Module, postprocessor: nn.Module, *, test_size: int = ModelConfig.test_size,
                 max_size: int = ModelConfig.max_size, categories: dict[int, str] | None = None,
                 label_map: LabelMap | None = None, device: str | torch.device = "cpu", batch_size: int = 4,
                 config: dict | None = None, compile: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.device = device if isinstance(device, torch.device) else select_device(device)
        self.model = model.eval().to(self.device)
        self.compiled = compile
        self._forward = self.model
        if compile:
            self._forward = torch.compile(self.model, options={"freezing": self.device.type == "cpu"})
        self.postprocessor = postprocessor
        self.test_size, self.max_size = test_size, max_size
        self.transform = build_eval_transform(test_size, max_size)
        if label_map is None:
            names = {int(k): str(v) for k, v in (categories or {}).items()}
            label_map = LabelMap(tuple((r, names.get(r, str(r))) for r in range(model.num_classes)))
        self.label_map = label_map
        self._category_ids = torch.tensor(label_map.category_ids, dtype=torch.int64)  # (K,) row -> category id
        self.batch_size = batch_size
        self.config = dict(config or {})

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto", batch_size: int = 4,
                        compile: bool = False) -> Detector:
        """Loads a pvt-detr training checkpoint (`main.py` output: model, config, categories) with weights_only.

        Raises CheckpointError (one line) for a missing, unreadable or non-pvt-detr file, a stored configuration
        that is incomplete or invalid, or weights that do not fit.
        """
        state = load_state_file(path)
        if not isinstance(state, dict) or "model" not in state or not isinstance(state.get("config"), dict):
            raise CheckpointError(f"{path}: not a pvt-detr training checkpoint (needs 'model' and 'config', as "
                                  "main.py writes)")
        try:
            config = stored_config(state, str(path))
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        model, _, postprocessors = build_model(config)
        report = load_detr_checkpoint(model, state["model"])
        if report.missing or report.skipped or report.unused:
            raise CheckpointError(f"{path}: weights do not fit the model of its config: "
                                  f"{str(report).replace(chr(10), '; ')}")
        model.aux_loss = False  # inference needs the last decoder layer only
        try:
            label_map = checkpoint_label_map(state)
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from None
        if label_map is not None and label_map.num_classes != model.num_classes:
            raise CheckpointError(f"{path}: its label map has {label_map.num_classes} rows but its model "
                                  f"{model.num_classes} classes")
        return cls(model, postprocessors["bbox"], test_size=config.test_size, max_size=config.max_size,
                   label_map=label_map, device=device, batch_size=batch_size, config=state["config"],
                   compile=compile)

    @property
    def categories(self) -> dict[int, str]:
        """Category id -> name of the categories the detector knows."""
        return self.label_map.names

    def preprocess(self, image) -> tuple[torch.Tensor, tuple[int, int]]:
        """One image (see `as_pil`) -> (evaluation tensor (3, h, w) normalised, original (H, W))."""
        pil = as_pil(image)
        return self.transform(pil), (pil.height, pil.width)

    @torch.no_grad()
    def predict_tensors(self, tensors: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]],
                        score_threshold: float = 0.5) -> list[Detections]:
        """Preprocessed images (3, h_i, w_i) (one batch) and their original (H_i, W_i) -> Detections per image."""
        samples = nested_tensor_from_tensor_list(list(tensors), size_divisibility=32).to(self.device)
        outputs = self._forward(samples)
        outputs = {k: v.float() for k, v in outputs.items() if isinstance(v, torch.Tensor)}
        target_sizes = torch.tensor(list(sizes), dtype=torch.int64, device=self.device)  # (B, 2) [h, w]
        results = []
        for det, size in zip(self.postprocessor(outputs, target_sizes), sizes):
            keep = det["scores"] >= score_threshold  # (Q,)
            labels = self._category_ids[det["labels"][keep].cpu()]  # class rows -> category ids
            results.append(Detections(boxes=det["boxes"][keep].cpu(), scores=det["scores"][keep].cpu(), labels=labels,
                                      names=[self.categories.get(int(c), str(int(c))) for c in labels],
                                      image_size=tuple(size)))
        return results

    def predict(self, images, score_threshold: float = 0.5, batch_size: int | None = None):
        """Detects objects in one image or a sequence of images (any sizes, any mix of input kinds).

        images: a path, PIL image, numpy array (H, W[, C]) or tensor (C, H, W) (see `as_pil`), or a list/tuple of
        them, or a (B, C, H, W) tensor / (B, H, W, C) array. Runs in batches of `batch_size` (default: the
        detector's). Returns Detections (scores >= score_threshold) for one image, a list of them for a batch.
        """
        single = not _is_batch(images)
        items = [images] if single else list(images)
        batch_size = batch_size or self.batch_size
        results: list[Detections] = []
        for start in range(0, len(items), batch_size):
            tensors, sizes = zip(*(self.preprocess(image) for image in items[start : start + batch_size]))
            results += self.predict_tensors(tensors, sizes, score_threshold)
        return results[0] if single else results

    def __repr__(self) -> str:
        params = sum(p.numel() for p in self.model.parameters())
        return (f"Detector({self.config.get('backbone', '?')} + DETR, {params / 1e6:.1f} M parameters, "
                f"{len(self.categories)} categories, test_size={self.test_size}, max_size={self.max_size}, "
                f"device={self.device})")
