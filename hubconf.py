"""torch.hub entry points, as facebookresearch/detr's: `torch.hub.load(REPO_DIR, "pvt_small_detr", source="local")`.

Nothing is downloaded: weights come from local files, an official PVT ImageNet checkpoint for the backbone
(`pretrained_backbone=PATH`) or a pvt-detr training checkpoint for the whole detector (`detector(PATH)`).
"""

from __future__ import annotations

import dataclasses

dependencies = ["torch", "torchvision", "scipy", "einops"]


def _detr(backbone: str, num_classes: int | None, pretrained_backbone: str | None, return_postprocessor: bool,
          overrides: dict):
    """build_model at `ModelConfig`'s defaults (the paper's recipe) with `overrides` as field values."""
    from pvt_detr import ModelConfig, build_model, load_pvt_checkpoint

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"{backbone}_detr: unknown option {unknown[0]!r} (ModelConfig has no such field)")
    config = ModelConfig.from_any({"backbone": backbone, "num_classes": num_classes, **overrides})
    model, _, postprocessors = build_model(config)
    if pretrained_backbone is not None:
        print(load_pvt_checkpoint(model.backbone, pretrained_backbone))
    return (model, postprocessors["bbox"]) if return_postprocessor else model


def pvt_tiny_detr(num_classes: int | None = 91, pretrained_backbone: str | None = None,
                  return_postprocessor: bool = False, **overrides):
    """PVT-Tiny + DETR (randomly initialised; `pretrained_backbone`: an official PVT ImageNet .pth).
    `overrides`: `pvt_detr.ModelConfig` fields (main.py's model flags), e.g. `num_queries=50`. With
    `return_postprocessor`: (model, PostProcess)."""
    return _detr("pvt_tiny", num_classes, pretrained_backbone, return_postprocessor, overrides)


def pvt_small_detr(num_classes: int | None = 91, pretrained_backbone: str | None = None,
                   return_postprocessor: bool = False, **overrides):
    """PVT-Small + DETR, the paper's detector (34.7 AP on COCO val2017 after its 50-epoch recipe); see
    `pvt_tiny_detr` for the arguments."""
    return _detr("pvt_small", num_classes, pretrained_backbone, return_postprocessor, overrides)


def pvt_medium_detr(num_classes: int | None = 91, pretrained_backbone: str | None = None,
                    return_postprocessor: bool = False, **overrides):
    """PVT-Medium + DETR; see `pvt_tiny_detr` for the arguments."""
    return _detr("pvt_medium", num_classes, pretrained_backbone, return_postprocessor, overrides)


def pvt_large_detr(num_classes: int | None = 91, pretrained_backbone: str | None = None,
                   return_postprocessor: bool = False, **overrides):
    """PVT-Large + DETR; see `pvt_tiny_detr` for the arguments."""
    return _detr("pvt_large", num_classes, pretrained_backbone, return_postprocessor, overrides)


def detector(checkpoint: str, device: str = "auto", batch_size: int = 4, compile: bool = False):
    """A trained detector from a pvt-detr training checkpoint (`main.py`'s `checkpoint.pth`): a
    `pvt_detr.inference.Detector`, whose `predict(images)` returns boxes, scores and category names."""
    from pvt_detr.inference import Detector

    return Detector.from_checkpoint(checkpoint, device=device, batch_size=batch_size, compile=compile)
