"""torchvision ImageNet models by name, for users with ImageNet-sized data.

Weights are never downloaded unless asked for with ``pretrained=True``; offline users pass a local
checkpoint to ``load_pretrained`` instead.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from qkd.errors import QKDError
from qkd.models.registry import register_model

_IMAGENET_CLASSES = 1000


def _build(tv_name: str, num_classes: int, pretrained: bool, **kw: Any) -> nn.Module:
    import torchvision  # imported late: it is slow to import and only these models need it

    if not pretrained:
        return torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, **kw)
    if num_classes != _IMAGENET_CLASSES:
        raise QKDError(
            f"torchvision pretrained weights for {tv_name} need num_classes={_IMAGENET_CLASSES}, "
            f"got {num_classes}; load a local checkpoint instead"
        )
    try:
        return torchvision.models.get_model(tv_name, weights="DEFAULT", **kw)
    except Exception as exc:  # URLError, OSError, hash RuntimeError...: all mean "no usable weights"
        raise QKDError(
            f"could not download the torchvision weights for {tv_name} ({type(exc).__name__}: {exc}); "
            "pass a local checkpoint instead"
        ) from None


@register_model
def tv_resnet18(num_classes: int = 10, pretrained: bool = False, **kw: Any) -> nn.Module:
    return _build("resnet18", num_classes, pretrained, **kw)


@register_model
def tv_resnet34(num_classes: int = 10, pretrained: bool = False, **kw: Any) -> nn.Module:
    return _build("resnet34", num_classes, pretrained, **kw)


@register_model
def tv_resnet50(num_classes: int = 10, pretrained: bool = False, **kw: Any) -> nn.Module:
    return _build("resnet50", num_classes, pretrained, **kw)


@register_model
def tv_mobilenet_v2(num_classes: int = 10, pretrained: bool = False, **kw: Any) -> nn.Module:
    return _build("mobilenet_v2", num_classes, pretrained, **kw)
