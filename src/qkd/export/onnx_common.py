"""What both ONNX targets share: the integer storage types, the tail of every export (contract, check,
write) and an onnxruntime session to run the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from qkd.errors import QKDError
from qkd.export.contract import apply_to_onnx, write_export

__all__ = ["FOUR_BIT", "onnx_runner", "run_onnx", "save_onnx", "storage_type"]

# (type, lowest code, highest code), narrowest first: the first that holds [qn, qp] stores the codes.
_STORAGE = [(TensorProto.UINT4, 0, 15), (TensorProto.INT4, -8, 7), (TensorProto.UINT8, 0, 255),
            (TensorProto.INT8, -128, 127)]  # fmt: skip
FOUR_BIT = (TensorProto.UINT4, TensorProto.INT4)


def storage_type(qn: int, qp: int, int4: bool) -> tuple[int, int, int]:
    """The narrowest ONNX integer type holding [qn, qp]: (type, its lowest code, its highest code)."""
    for dtype, lo, hi in _STORAGE:
        if lo <= qn and qp <= hi and (int4 or dtype not in FOUR_BIT):
            return dtype, lo, hi
    raise QKDError(f"integer range [{qn}, {qp}] fits no 8-bit ONNX type")


def save_onnx(model: onnx.ModelProto, path: str | Path, contract: dict | None) -> Path:
    """The tail of every ONNX export: ``contract`` into the model (:func:`~qkd.export.contract.apply_to_onnx`),
    ``onnx.checker.check_model`` (full check), then the file written atomically; returns the path."""
    if contract is not None:
        apply_to_onnx(model, contract)
    onnx.checker.check_model(model, full_check=True)
    write_export(path, model.SerializeToString())
    return Path(path)


def onnx_runner(path: str | Path, fused: bool = False):
    """One onnxruntime CPU session for an exported model; returns ``f(x) -> logits`` (numpy in and out).

    ``fused=False`` (the default, what the export's verification and the tests use) runs the graph as written:
    QuantizeLinear/DequantizeLinear in float around float convolutions, the fake-quant arithmetic. ``fused=True``
    lets onnxruntime turn ``DequantizeLinear -> Conv -> QuantizeLinear`` into integer kernels (QLinearConv):
    faster, but they quantize the bias to int32 and requantize in their own rounding, so an activation code near
    a rounding boundary can land one step off (on the same grids).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not fused:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    # onnxruntime's Clip->QuantizeLinear fusion rejects 4-bit zero points (ReLU6 before a UINT4
    # quantizer fails to load); the graph runs the same without that fusion.
    session = ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=["ClipQuantRewrite"]
    )
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def run_onnx(path: str | Path, x: np.ndarray, fused: bool = False) -> np.ndarray:
    """Run an exported model with onnxruntime on the CPU; returns the first output (the logits). ``fused``: see
    :func:`onnx_runner`."""
    return onnx_runner(path, fused)(x)
