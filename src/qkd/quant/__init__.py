"""Trainable quantizers and quantized layers. Knows nothing of models or distillation."""

from qkd.quant.convert import (
    QuantConfig,
    calibrate,
    dequantize_model,
    is_quantized,
    quant_parameters,
    quantization_disabled,
    quantize_model,
    quantizers,
    recalibrate_bn,
    set_quantization,
)
from qkd.quant.modules import QConv2d, QLinear
from qkd.quant.quantizers import IntervalQuantizer, LSQQuantizer, Quantizer, QuantSpec, make_quantizer

__all__ = [
    "IntervalQuantizer",
    "LSQQuantizer",
    "QConv2d",
    "QLinear",
    "QuantConfig",
    "QuantSpec",
    "Quantizer",
    "calibrate",
    "dequantize_model",
    "is_quantized",
    "make_quantizer",
    "quant_parameters",
    "quantization_disabled",
    "quantize_model",
    "quantizers",
    "recalibrate_bn",
    "set_quantization",
]
