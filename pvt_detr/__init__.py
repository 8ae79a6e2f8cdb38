"""pvt-detr: a convolution-free PVT backbone + DETR detector."""

from pvt_detr.backbone.registry import build_backbone, list_backbones, register_backbone
from pvt_detr.checkpoints import load_detr_checkpoint, load_pvt_checkpoint
from pvt_detr.config import ModelConfig
from pvt_detr.detr import DETR, build_model
from pvt_detr.label_map import LabelMap
from pvt_detr.nested_tensor import NestedTensor, nested_tensor_from_tensor_list

__all__ = [
    "DETR",
    "LabelMap",
    "ModelConfig",
    "NestedTensor",
    "build_backbone",
    "build_model",
    "list_backbones",
    "load_detr_checkpoint",
    "load_pvt_checkpoint",
    "nested_tensor_from_tensor_list",
    "register_backbone",
]
