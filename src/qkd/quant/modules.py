"""Quantized layers: a float layer plus a weight and an input-activation quantizer, in two forms.

- Swapped: :class:`QConv2d` / :class:`QLinear` replace a plain ``nn.Conv2d`` / ``nn.Linear`` (or a
  subclass that only adds initialisation). ``from_float`` shares the original parameters, so
  optimizers and pretrained weights carry over, and ``to_float`` gives the original layer back.
- In place: any other Conv/Linear-like layer (Conv1d/3d, ConvTranspose, a subclass with its own
  forward) keeps its object and its forward; :func:`quantize_in_place` gives it a
  :class:`QuantizedLayer` class and fake-quantizes its weight through a parametrization.

The float weight stays the trained parameter; the quantizers fake-quantize it and the layer's input
on every forward pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from qkd.quant.config import QuantSpec
from qkd.quant.quantizer import Quantizer, make_quantizer

FLOAT_REASON = "qkd_float_reason"  # attribute naming why quantize_model left a layer float


class _QuantMixin:
    weight_quant: Quantizer
    act_quant: Quantizer
    float_class: type[nn.Module]

    def _attach(self, float_layer: nn.Module, weight_spec: QuantSpec, act_spec: QuantSpec) -> None:
        self.weight = float_layer.weight
        self.bias = float_layer.bias
        self.weight_quant = make_quantizer(weight_spec, init=float_layer.weight.detach())
        self.act_quant = make_quantizer(act_spec)
        self.float_class = type(float_layer)  # a subclass that only adds initialisation comes back as itself
        self.train(float_layer.training)

    def _restore_class(self, layer: nn.Module) -> nn.Module:
        layer.__class__ = self.float_class
        return layer


class QConv2d(_QuantMixin, nn.Conv2d):
    """Conv2d with fake-quantized weights and input (depthwise and grouped convs included).

    Its state dict keys are the float layer's (``weight``, ``bias``) plus ``weight_quant.*`` and
    ``act_quant.*``.

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
        """The float layer back (of its original class), sharing this layer's parameters."""
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
        return self._restore_class(conv)


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
        """The float layer back (of its original class), sharing this layer's parameters."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None)
        linear.weight, linear.bias = self.weight, self.bias
        return self._restore_class(linear)


QUANT_MODULES: dict[type[nn.Module], type[nn.Module]] = {nn.Conv2d: QConv2d, nn.Linear: QLinear}
SWAPPED = (QConv2d, QLinear)


class QuantizedLayer(nn.Module):
    """Mixin of a layer quantized in place: its own forward runs on the quantized input and weight.

    :func:`quantize_in_place` turns a layer of class ``C`` into one of class ``QC(QuantizedLayer, C)``
    (made once per ``C``) whose ``forward(x, *args, **kwargs)`` is ``C.forward(self, act_quant(x), ...)``;
    every read of ``self.weight`` inside it gives the fake-quantized weight (a parametrization).

    - ``act_quant``: the input quantizer; ``weight_quant``: the weight quantizer;
    - ``parametrizations.weight.original``: the float weight (the trained parameter);
    - ``float_class``: ``C``.

    >>> conv = quantize_in_place(nn.Conv1d(4, 8, 3), QuantSpec(4, signed=True), QuantSpec(4))
    >>> isinstance(conv, QuantizedLayer), isinstance(conv, nn.Conv1d)
    (True, True)
    """

    float_class: type[nn.Module]
    act_quant: Quantizer

    @property
    def weight_quant(self) -> Quantizer:
        return self.parametrizations.weight[0]

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return self.float_class.forward(self, self.act_quant(x), *args, **kwargs)


_IN_PLACE_CLASSES: dict[type[nn.Module], type[QuantizedLayer]] = {}


def _in_place_class(cls: type[nn.Module]) -> type[QuantizedLayer]:
    """``Q<cls>``: :class:`QuantizedLayer` over ``cls``, one per class so isinstance checks hold."""
    if cls not in _IN_PLACE_CLASSES:
        _IN_PLACE_CLASSES[cls] = type(f"Q{cls.__name__}", (QuantizedLayer, cls), {"float_class": cls})
    return _IN_PLACE_CLASSES[cls]


def quantize_in_place(layer: nn.Module, weight_spec: QuantSpec, act_spec: QuantSpec) -> QuantizedLayer:
    """Quantize ``layer`` keeping its object and forward; ConvTranspose weights get per-channel
    parameters along dim 1 (their output channels). The caller checks the layer can take it."""
    if getattr(layer, "transposed", False):
        weight_spec = dataclasses.replace(weight_spec, channel_dim=1)
    weight_quant = make_quantizer(weight_spec, init=layer.weight.detach())
    layer.__class__ = _in_place_class(type(layer))
    layer.act_quant = make_quantizer(act_spec)
    parametrize.register_parametrization(layer, "weight", weight_quant, unsafe=True)
    return layer


def dequantize_in_place(layer: QuantizedLayer) -> nn.Module:
    """Undo :func:`quantize_in_place`: the float weight parameter and the original class back."""
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
    del layer.act_quant
    layer.__class__ = layer.float_class
    return layer


def is_generic_quantized(module: nn.Module) -> bool:
    """Whether ``module`` was quantized in place (see :class:`QuantizedLayer`)."""
    return isinstance(module, QuantizedLayer)


def is_quantized_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized layer of either form (swapped or in place)."""
    return isinstance(module, (*SWAPPED, QuantizedLayer))
