"""qkd: Quantization-aware Knowledge Distillation (Kim et al., arXiv:1911.12491).

>>> import qkd
>>> student = qkd.quantize_model(my_float_model, qkd.QuantConfig(weight_bits=4, act_bits=4))
"""

from qkd.errors import QKDError
from qkd.quant import QuantConfig, quantization_disabled, quantize_model

__version__ = "0.1.0"
__all__ = ["QKDError", "QuantConfig", "quantization_disabled", "quantize_model", "__version__"]
