"""PVT backbones."""

from pvt_detr.backbone.pvt import PyramidVisionTransformer
from pvt_detr.backbone.registry import build_backbone, list_backbones, register_backbone

__all__ = ["PyramidVisionTransformer", "build_backbone", "list_backbones", "register_backbone"]
