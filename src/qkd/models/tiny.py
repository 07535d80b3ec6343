"""Tiny models for the built-in default job (scikit-learn digits: 1x8x8) and for fast tests.

They train in seconds on a CPU, so the whole QKD pipeline can run end to end without a GPU or downloads.
"""

from __future__ import annotations

import torch
from torch import nn

from qkd.models.registry import register_model

__all__ = ["TinyCNN"]


def _conv_bn_relu(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
    )


class TinyCNN(nn.Module):
    """Three conv-BN-ReLU layers and a linear head; one stride-2 step suits 8x8 digits."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, width),
            _conv_bn_relu(width, 2 * width, stride=2),
            _conv_bn_relu(2 * width, 2 * width),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@register_model
def tiny_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> TinyCNN:
    """The default student."""
    return TinyCNN(in_channels=in_channels, num_classes=num_classes, width=width)


@register_model
def tiny_cnn_wide(num_classes: int = 10, in_channels: int = 1, width: int = 48) -> TinyCNN:
    """The default teacher: same shape as the student, three times wider."""
    return TinyCNN(in_channels=in_channels, num_classes=num_classes, width=width)


@register_model
def tiny_mlp(num_classes: int = 10, in_channels: int = 1, image_size: int = 8, hidden: int = 64) -> nn.Module:
    """A conv-free model, standing in for an arbitrary user model in tests."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
