"""Trainable quantizers and quantized layers. Knows nothing of models or distillation.

``config`` holds the settings (no torch: a run config reads them), ``quantizer`` the quantizers, ``modules``
the quantized layers, ``convert`` turns a model's layers into them, ``summary`` says what became of each,
``budget`` chooses each layer's bits within a size or cost budget.
Names are imported on first use.
"""

from qkd.lazy import lazy_names

__getattr__, __all__ = lazy_names(__name__, {
    "budget": ("allocate", "assigned", "choose_bits", "plan_budget"),
    "config": ("Budget", "QuantConfig", "QuantSpec"),
    "convert": ("calibrate", "default_filter", "dequantize_model", "is_layer_like", "is_quantized",
                "quant_parameters", "quantization_disabled", "quantize_model", "quantized_layers", "quantizers",
                "recalibrate_bn", "set_quantization"),
    "modules": ("QConv2d", "QLinear", "QuantizedLayer", "is_generic_quantized", "is_quantized_layer"),
    "quantizer": ("IntervalQuantizer", "LSQQuantizer", "Quantizer", "make_quantizer"),
    "summary": ("QuantSummary", "quantization_summary"),
})  # fmt: skip
