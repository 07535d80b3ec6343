"""CIFAR ResNets for 32x32 inputs (He et al. 2016, section 4.2).

Module names and the parameter-free option-A shortcut follow akamaster/pytorch_resnet_cifar10 exactly, so
its published checkpoints (the default teachers) load without key remapping. ReLUs are separate modules
and the residual add is a plain tensor add, so quantizers can wrap or hook each activation site.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qkd.models.registry import register_model

__all__ = ["BasicBlock", "CifarResNet", "PadShortcut"]


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad channels; no weights, matching the checkpoints."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        needs_projection = stride != 1 or in_planes != planes
        self.shortcut: nn.Module = PadShortcut(planes) if needs_projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) with widths 16/32/64 and strides 1/2/2."""

    def __init__(self, num_blocks: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = _make_stage(16, 16, num_blocks, stride=1)
        self.layer2 = _make_stage(16, 32, num_blocks, stride=2)
        self.layer3 = _make_stage(32, 64, num_blocks, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(self.pool(out), 1))


def _make_stage(in_planes: int, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
    strides = [stride] + [1] * (num_blocks - 1)
    blocks = []
    for s in strides:
        blocks.append(BasicBlock(in_planes, planes, s))
        in_planes = planes
    return nn.Sequential(*blocks)


def _kaiming_init(model: nn.Module) -> None:
    """Same init as the reference code, so training from scratch reproduces its behaviour."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight)


@register_model
def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(3, num_classes=num_classes, in_channels=in_channels)


@register_model
def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(5, num_classes=num_classes, in_channels=in_channels)


@register_model
def resnet44(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(7, num_classes=num_classes, in_channels=in_channels)


@register_model
def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(9, num_classes=num_classes, in_channels=in_channels)


@register_model
def resnet110(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(18, num_classes=num_classes, in_channels=in_channels)
