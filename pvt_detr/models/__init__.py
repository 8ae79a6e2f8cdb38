"""PVT backbones."""

from pvt_detr.models.pvt import PyramidVisionTransformer
from pvt_detr.models.registry import build_backbone, list_backbones, register_backbone

__all__ = ["PyramidVisionTransformer", "build_backbone", "list_backbones", "register_backbone"]
