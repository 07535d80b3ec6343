"""Trainable quantizers and quantized layers. Knows nothing of models or distillation."""

from qkd.quant.convert import (
    QuantConfig,
    calibrate,
    default_filter,
    dequantize_model,
    is_layer_like,
    is_quantized,
    quant_parameters,
    quantization_disabled,
    quantize_model,
    quantized_layers,
    quantizers,
    recalibrate_bn,
    set_quantization,
)
from qkd.quant.modules import QConv2d, QLinear, QuantizedLayer, is_generic_quantized, is_quantized_layer
from qkd.quant.quantizers import IntervalQuantizer, LSQQuantizer, Quantizer, QuantSpec, make_quantizer
from qkd.quant.summary import QuantSummary, quantization_summary

__all__ = [
    "IntervalQuantizer",
    "LSQQuantizer",
    "QConv2d",
    "QLinear",
    "QuantConfig",
    "QuantSpec",
    "QuantSummary",
    "QuantizedLayer",
    "Quantizer",
    "calibrate",
    "default_filter",
    "dequantize_model",
    "is_generic_quantized",
    "is_layer_like",
    "is_quantized",
    "is_quantized_layer",
    "make_quantizer",
    "quant_parameters",
    "quantization_disabled",
    "quantization_summary",
    "quantize_model",
    "quantized_layers",
    "quantizers",
    "recalibrate_bn",
    "set_quantization",
]
