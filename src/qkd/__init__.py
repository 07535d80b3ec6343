"""qkd: Quantization-aware Knowledge Distillation (Kim et al., arXiv:1911.12491).

QKD on your own model and data, in one call (self-study, co-study, tutoring; see README):

>>> import qkd
>>> result = qkd.fit(student, teacher, train_loader, val_loader, method="qkd", epochs=30,
...                  quant=qkd.QuantConfig(weight_bits=4, act_bits=4), out="runs/mine")
>>> result.student                       # the trained low-bit model (fake-quant, exportable)
>>> print(qkd.quantization_summary(result.student))   # every layer's bits, or why it stayed float

Or only the quantization, for your own training loop:

>>> student = qkd.quantize_model(my_float_model, qkd.QuantConfig(weight_bits=4, act_bits=4))
"""

import sys

from qkd import distributed
from qkd._version import __version__
from qkd.config import TrainConfig
from qkd.errors import Diverged, QKDError, Stopped
from qkd.phases import Distill
from qkd.quant import QuantConfig, quantization_disabled, quantization_summary, quantize_model
from qkd.train import METHODS, FitResult, Trainer, fit

# qkd.dist: the old name of qkd.distributed (it read as "distillation"), kept for old imports
dist = sys.modules.setdefault("qkd.dist", distributed)

__all__ = [
    "METHODS",
    "Distill",
    "Diverged",
    "FitResult",
    "QKDError",
    "QuantConfig",
    "Stopped",
    "TrainConfig",
    "Trainer",
    "__version__",
    "fit",
    "quantization_disabled",
    "quantization_summary",
    "quantize_model",
]
