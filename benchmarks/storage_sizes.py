"""File sizes of one quantized network in every storage: QDQ ONNX with 8-bit codes, with INT4/UINT4 codes
(``--four-bit-storage``), the packed int file (``--format int``) and the float32 checkpoint; and whether
onnxruntime and OpenVINO load and run the INT4 file, agreeing with the fake-quant model (issue 26, item 3).

ResNet-20 (CIFAR, 32 px) with the quantizer settings of the presets ``cifar10-resnet20-w4a4`` and ``-w2a2``
(first/last layers 8-bit), random weights calibrated on random images: sizes depend on the shapes and bit-widths,
not on the values.

    python benchmarks/storage_sizes.py
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line  # noqa: E402

from qkd.config import load_config  # noqa: E402
from qkd.export import export_onnx, run_onnx  # noqa: E402
from qkd.export.api import export_student, float_checkpoint_bytes  # noqa: E402
from qkd.models import create_model  # noqa: E402
from qkd.quant import calibrate, quantize_model  # noqa: E402


def _openvino(path: Path, x: np.ndarray) -> np.ndarray | str:
    try:
        import openvino as ov
    except ImportError:
        return "openvino not installed"
    try:
        compiled = ov.Core().compile_model(str(path), "CPU")
        return np.concatenate([compiled(x[i : i + 1])[0] for i in range(len(x))])
    except Exception as e:  # report what OpenVINO says, one line
        return f"refused: {str(e).splitlines()[0][:120]}"


def _agreement(got: np.ndarray | str, expected: np.ndarray) -> str:
    if isinstance(got, str):
        return got
    diff = np.abs(got - expected).max() / np.abs(expected).max()
    return f"top-1 {100 * (got.argmax(1) == expected.argmax(1)).mean():.0f} %, max diff / max logit {diff:.1e}"


def measure(preset: str, tmp: Path) -> list[str]:
    torch.manual_seed(0)
    model = quantize_model(create_model("resnet20"), load_config(preset).quant)
    calibrate(model, torch.randn(32, 3, 32, 32))
    model.eval()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    eight = export_onnx(model, x[:1], tmp / "eight.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the interval preset's float-offset notice: said once, in the table
        four = export_onnx(model, x[:1], tmp / "four.onnx", four_bit_storage=True)
    export_student(model, "int", tmp / "int.safetensors", x[:1], {})
    sizes = {"QDQ ONNX, 8-bit codes": eight.stat().st_size, "QDQ ONNX, INT4/UINT4 codes": four.stat().st_size,
             "int file (packed)": (tmp / "int.safetensors").stat().st_size,
             "float32 checkpoint (state dict)": float_checkpoint_bytes(model)}  # fmt: skip
    rows = [f"| {preset} | {k} | {v / 1024:.1f} |" for k, v in sizes.items()]
    ort_four = _agreement(run_onnx(four, x.numpy()), expected)
    ov_four = _agreement(_openvino(four, x.numpy()), expected)
    rows.append(f"| {preset} | INT4 file in onnxruntime / OpenVINO | {ort_four} / {ov_four} |")
    return rows


def main() -> None:
    lines = ["| preset | storage | KiB |", "|---|---|---:|"]
    for preset in ("cifar10-resnet20-w4a4", "cifar10-resnet20-w2a2"):
        with tempfile.TemporaryDirectory() as d:
            lines += measure(preset, Path(d))
    print(f"Command: `{command_line()}`\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
