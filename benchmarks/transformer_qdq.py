"""QDQ ONNX of the transformer-style torchvision families: top-1 agreement with the fake-quant model.

For ConvNeXt, ViT, Swin and MaxViT (``weights=None``, 10 classes; the head redrawn and ConvNeXt's layer scale set
to 0.1 so that the top-1 differs from image to image), ``quantize_model`` (first and last layers 8-bit),
calibration on 8 images, ``export_onnx`` (QDQ), then onnxruntime (QDQ fusion off, the graph as written) against
the fake-quant model on other images: top-1 agreement and the largest logit difference (beside the fake-quant
model's own float32 against float64: how far rounding alone moves it), the layers quantized / left float, and how
many quantized layers the file holds as ``DequantizeLinear(int8 initializer) -> Conv/MatMul/Gemm``. Images:
CIFAR-10 test images resized to the input side (random ones without ../shared/data).
Prints a markdown table; writes nothing.

    python benchmarks/transformer_qdq.py                      # the four families, W4A4 and W8A8
    python benchmarks/transformer_qdq.py --only vit_b_16 --bits 4 --images 32
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torchvision
from common import DATA_DIR, command_line, machine
from onnx import TensorProto
from torch.nn import functional as F

from qkd.export import compare, onnx_runner
from qkd.export.onnx_qdq import export_onnx
from qkd.export.verify import float64_reference
from qkd.quant import QuantConfig, calibrate, quantization_summary, quantize_model

# variant -> (input side, builder arguments): the smallest side each accepts (MaxViT's 7x7 partitions need 224)
FAMILIES: dict[str, tuple[int, dict]] = {
    "convnext_tiny": (64, {}),
    "vit_b_16": (64, {"image_size": 64}),
    "swin_t": (64, {}),
    "maxvit_t": (224, {}),
}
CALIBRATION = 8


def _images(n: int, side: int) -> torch.Tensor:
    """``n`` CIFAR-10 test images (normalised per channel), resized to ``side``; random ones without the data."""
    path = DATA_DIR / "cifar10-jpeg-test.npz"
    if not path.exists():
        return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(1))
    x = torch.from_numpy(np.load(path)["x"][::97][:n]).permute(0, 3, 1, 2).float() / 255
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    return F.interpolate(x, size=side, mode="bilinear", align_corners=False)


def _spread(model: torch.nn.Module) -> torch.nn.Module:
    """torchvision's initialisation, but a head drawn at random and ConvNeXt's layer scale at 0.1: every image's
    top-1 is otherwise the same (zero head, 1e-6 layer scale). Weights drawn at random everywhere were tried
    first: the logits then lie so close that float32 rounding alone changes the fake-quant model's own top-1
    (convnext_tiny W8A8: 31 of 32 images against its float64 twin)."""
    gen = torch.Generator().manual_seed(0)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) / head.weight.shape[1] ** 0.5)
        for name, p in model.named_parameters():
            if "layer_scale" in name:
                p.fill_(0.1)
    return model


def _integer_weight_layers(path: Path) -> int:
    """Conv/MatMul/Gemm whose weight is ``DequantizeLinear`` of an 8-bit initializer."""
    graph = onnx.load(str(path)).graph
    inits = {t.name: t.data_type for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    count = 0
    for node in graph.node:
        dq = producers.get(node.input[1]) if node.op_type in ("Conv", "MatMul", "Gemm") else None
        if dq is not None and dq.op_type == "DequantizeLinear":
            count += inits.get(dq.input[0]) in (TensorProto.INT8, TensorProto.UINT8)
    return count


def measure(variant: str, bits: int, n_images: int, tmp: Path) -> dict:
    side, kwargs = FAMILIES[variant]
    x = _images(CALIBRATION + n_images, side)
    torch.manual_seed(0)
    model = _spread(torchvision.models.get_model(variant, weights=None, num_classes=10, **kwargs))
    t0 = time.perf_counter()
    quantize_model(model, QuantConfig(weight_bits=bits, act_bits=bits))
    calibrate(model, x[:CALIBRATION])
    summary = quantization_summary(model.eval())
    t1 = time.perf_counter()
    path = export_onnx(model, x[:2], tmp / f"{variant}.onnx")
    t2 = time.perf_counter()
    run = onnx_runner(path)
    check = x[CALIBRATION:]
    result = compare(lambda t: torch.from_numpy(run(t.numpy())), model, [(check, torch.zeros(len(check)))])
    with torch.no_grad():
        logits, exact = model(check), float64_reference(model)(check.double())
    classes, own = logits.argmax(1).unique().numel(), (logits.argmax(1) == exact.argmax(1)).double().mean()
    return {"variant": variant, "side": side, "bits": bits, "layers": f"{summary.n_quantized} / {summary.n_float}",
            "integer": _integer_weight_layers(path), "images": result["images"], "agreement": result["agreement"],
            "max_diff": result["max_logit_diff"], "classes": classes, "own": float(own),
            "own_diff": float((logits.double() - exact).abs().max()), "quantize_s": t1 - t0, "export_s": t2 - t1,
            "check_s": time.perf_counter() - t2}  # fmt: skip


def _table(rows: list[dict]) -> str:
    lines = ["| variant | side | W/A bits | quantized / float layers | DQ(int8) -> Conv/MatMul/Gemm | images | "
             "top-1 agreement | max logit diff | fake-quant f32 vs f64: agreement, max diff | distinct top-1 | "
             "quantize s | export s | check s |",
             "|" + "---|" * 13]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['variant']} | {r['side']} | {r['bits']} | {r['layers']} | {r['integer']} | {r['images']} | "
                     f"{r['agreement']:.1%} | {r['max_diff']:.2g} | {r['own']:.1%}, {r['own_diff']:.2g} | "
                     f"{r['classes']} | {r['quantize_s']:.0f} | {r['export_s']:.0f} | "
                     f"{r['check_s']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(FAMILIES), help="variants (default: all four)")
    parser.add_argument("--bits", nargs="*", type=int, default=[4, 8], help="weight and activation bits")
    parser.add_argument("--images", type=int, default=32, help="check images per model")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # 2 shared cores: one thread each
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.only or FAMILIES:
            for bits in args.bits:
                rows.append(measure(variant, bits, args.images, Path(tmp)))
                print(rows[-1], flush=True)
    print(f"\n{command_line()}\n{machine()}\n\n{_table(rows)}")


if __name__ == "__main__":
    main(sys.argv[1:])
