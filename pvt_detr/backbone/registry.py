"""Backbone registry: named PVT variants as small factories over one class (timm style)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pvt_detr.backbone.pvt import PyramidVisionTransformer

_BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Registers a factory under its function name; a duplicate name raises."""
    name = fn.__name__
    if name in _BACKBONES:
        raise ValueError(f"backbone {name!r} is already registered")
    _BACKBONES[name] = fn
    return fn


def list_backbones() -> list[str]:
    """Names of all registered backbones."""
    return sorted(_BACKBONES)


def build_backbone(name: str, **overrides) -> nn.Module:
    """Builds a registered backbone; keyword overrides go to the model class (e.g. drop_path_rate, out_indices)."""
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(list_backbones())}")
    return _BACKBONES[name](**overrides)


# The paper's variants (Table 1): dims 64/128/320/512, heads 1/2/5/8, mlp 8/8/4/4, sr 8/4/2/1.
@register_backbone
def pvt_tiny(**kwargs) -> PyramidVisionTransformer:
    return PyramidVisionTransformer(depths=(2, 2, 2, 2), **kwargs)


@register_backbone
def pvt_small(**kwargs) -> PyramidVisionTransformer:
    return PyramidVisionTransformer(depths=(3, 4, 6, 3), **kwargs)


@register_backbone
def pvt_medium(**kwargs) -> PyramidVisionTransformer:
    return PyramidVisionTransformer(depths=(3, 4, 18, 3), **kwargs)


@register_backbone
def pvt_large(**kwargs) -> PyramidVisionTransformer:
    return PyramidVisionTransformer(depths=(3, 8, 27, 3), **kwargs)


# Not from the paper: a half-width, one-block-per-stage PVT for CPU demos and tests (about 1.2 M parameters).
@register_backbone
def pvt_nano(**kwargs) -> PyramidVisionTransformer:
    return PyramidVisionTransformer(embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8), depths=(1, 1, 1, 1),
                                    **kwargs)
