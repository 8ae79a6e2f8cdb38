"""Drawing detections on images with `torchvision.utils.draw_bounding_boxes`."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c", "#fabebe",
           "#008080", "#e6beff", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075"]


def draw_detections(image: torch.Tensor, boxes_xyxy: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor,
                    names: dict[int, str] | None = None, width: int = 2) -> torch.Tensor:
    """image: (3, H, W) uint8; boxes_xyxy: (N, 4) absolute; labels, scores: (N,) -> (3, H, W) uint8 with boxes drawn.

    Each class gets its own colour; captions read "name 0.93".
    """
    names = names or {}
    captions = [f"{names.get(int(c), str(int(c)))} {float(s):.2f}" for c, s in zip(labels, scores)]
    colors = [PALETTE[int(c) % len(PALETTE)] for c in labels]
    if len(boxes_xyxy) == 0:
        return image.clone()
    h, w = image.shape[1:]
    boxes = boxes_xyxy.detach().float().cpu().clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h - 1)
    return draw_bounding_boxes(image, boxes, labels=captions, colors=colors, width=width)


def draw_on_image(image: Image.Image, boxes_xyxy: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor,
                  names: dict[int, str] | None = None, min_side: int = 512) -> Image.Image:
    """RGB PIL image + detections in its pixels -> a new PIL image with labelled boxes. Images whose long side is
    under `min_side` are first enlarged by a whole factor (nearest neighbour, so pixels stay visible) and the boxes
    with them, so that boxes and captions can be read on small images."""
    scale = max(1, math.ceil(min_side / max(image.size)))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # (3, H, W) uint8
    width = max(2, round(max(image.size) / 400))
    drawn = draw_detections(pixels, boxes_xyxy * scale, labels, scores, names, width=width)
    return Image.fromarray(drawn.permute(1, 2, 0).numpy())  # (H, W, 3)
