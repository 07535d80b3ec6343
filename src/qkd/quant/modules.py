"""Quantized drop-in layers: a float Conv2d/Linear plus a weight and an input-activation quantizer.

The float weight stays the trained parameter; the quantizers fake-quantize it and the layer's input
on every forward pass. ``from_float`` shares the original parameters, so optimizers and pretrained
weights carry over, and ``to_float`` gives the plain layer back.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from qkd.quant.quantizers import QuantSpec, make_quantizer


class _QuantMixin:
    weight_quant: nn.Module
    act_quant: nn.Module

    def _attach(self, float_layer: nn.Module, weight_spec: QuantSpec, act_spec: QuantSpec) -> None:
        self.weight = float_layer.weight
        self.bias = float_layer.bias
        self.weight_quant = make_quantizer(weight_spec, init=float_layer.weight.detach())
        self.act_quant = make_quantizer(act_spec)


class QConv2d(_QuantMixin, nn.Conv2d):
    """Conv2d with fake-quantized weights and input (depthwise and grouped convs included).

    >>> qconv = QConv2d.from_float(nn.Conv2d(3, 8, 3), QuantSpec(4, signed=True), QuantSpec(4))
    """

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_spec: QuantSpec, act_spec: QuantSpec) -> QConv2d:
        q = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        q._attach(conv, weight_spec, act_spec)
        return q

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.act_quant(x), self.weight_quant(self.weight), self.bias)

    def to_float(self) -> nn.Conv2d:
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.bias is not None,
            self.padding_mode,
        )
        conv.weight, conv.bias = self.weight, self.bias
        return conv


class QLinear(_QuantMixin, nn.Linear):
    """Linear with fake-quantized weights and input."""

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_spec: QuantSpec, act_spec: QuantSpec) -> QLinear:
        q = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        q._attach(linear, weight_spec, act_spec)
        return q

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.act_quant(x), self.weight_quant(self.weight), self.bias)

    def to_float(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None)
        linear.weight, linear.bias = self.weight, self.bias
        return linear


QUANT_MODULES: dict[type[nn.Module], type[nn.Module]] = {nn.Conv2d: QConv2d, nn.Linear: QLinear}
