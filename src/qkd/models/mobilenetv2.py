"""MobileNetV2 (Sandler et al. 2018) adapted to 32x32 inputs.

The stem and the first two stride-2 stages of the ImageNet layout run at stride 1 instead, otherwise a
32x32 image would shrink to 1x1 long before the head. Depthwise convs make it the hard case for low-bit
quantization, which is why it is a student here.
"""

from __future__ import annotations

import torch
from torch import nn

from qkd.models.registry import register_model

__all__ = ["InvertedResidual", "MobileNetV2Cifar"]

# (expansion t, output channels c, repeats n, first stride s); s is the CIFAR setting, see module doc.
CIFAR_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of 8 (as torchvision does) without dropping more than 10%."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> linear project (1x1); no activation after the projection."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_ch * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn(in_ch, hidden, 1))
        layers.append(_conv_bn(hidden, hidden, 3, stride, groups=hidden))
        layers.append(_conv_bn(hidden, out_ch, 1, act=False))
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2Cifar(nn.Module):
    """MobileNetV2 with CIFAR strides; ``features`` / ``classifier`` naming as in torchvision."""

    def __init__(
        self, num_classes: int = 10, width_mult: float = 1.0, dropout: float = 0.0, in_channels: int = 3
    ) -> None:
        super().__init__()
        in_ch = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [_conv_bn(in_channels, in_ch, 3, stride=1)]
        for t, c, n, s in CIFAR_SETTING:
            out_ch = _make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        layers.append(_conv_bn(in_ch, self.last_channel, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.last_channel, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.flatten(self.pool(self.features(x)), 1)
        return self.classifier(self.dropout(out))


def _init_weights(model: nn.Module) -> None:
    """torchvision's MobileNetV2 init, so from-scratch training behaves like the reference."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


@register_model
def mobilenetv2_cifar(
    num_classes: int = 10, width_mult: float = 1.0, dropout: float = 0.0, in_channels: int = 3
) -> MobileNetV2Cifar:
    return MobileNetV2Cifar(num_classes, width_mult=width_mult, dropout=dropout, in_channels=in_channels)
