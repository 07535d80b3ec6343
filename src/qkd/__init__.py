"""qkd: Quantization-aware Knowledge Distillation (Kim et al., arXiv:1911.12491).

QKD on your own model and data, in one call (self-study, co-study, tutoring; see README):

>>> import qkd
>>> result = qkd.fit(student, teacher, train_loader, val_loader, method="qkd", epochs=30,
...                  quant=qkd.QuantConfig(weight_bits=4, act_bits=4), out="runs/mine")
>>> result.student                       # the trained low-bit model (fake-quant, exportable)
>>> print(qkd.quantization_summary(result.student))   # every layer's bits, or why it stayed float

Or only the quantization, for your own training loop:

>>> student = qkd.quantize_model(my_float_model, qkd.QuantConfig(weight_bits=4, act_bits=4))

And any quantized model to a deployable file (int, onnx, onnx-int, executorch), checked to run:

>>> run = qkd.export_model(result.student, "executorch", "student.pte", example_batch)
"""

from qkd._version import __version__
from qkd.lazy import keep_old_paths, lazy_names

# Read on first use: `import qkd` (and the command line's --help and refusals) imports no torch before it must.
__getattr__, _names = lazy_names(__name__, {
    "config": ("TrainConfig",),
    "errors": ("Diverged", "QKDError", "Stopped"),
    "export": ("export_model",),
    "methods": ("Distill", "METHODS"),
    "quant": ("QuantConfig", "quantization_disabled", "quantization_summary", "quantize_model"),
    "train": ("FitResult", "Trainer", "fit"),
    "distributed": (),
})  # fmt: skip
__all__ = [*_names, "__version__"]

# qkd.dist: the old name of qkd.distributed (it read as "distillation"), kept for old imports
keep_old_paths(__name__, {"dist": ("distributed",)})
