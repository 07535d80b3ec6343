"""Survey: one small variant of every torchvision classification family through quantization and export.

For each family: build it (``weights=None``, 10 classes), set its BatchNorm statistics on eight random
images, ``quantize_model`` at W4A4 (first and last layers 8-bit), calibrate on the same images (and
set the statistics again), take one SGD step (gradient norm clipped to 1), then export it to the integer
program (``to_int_program`` + ``IntRuntime``) and to ONNX with integer convolutions (``onnx-int``) and
measure top-1 agreement with the float64 fake-quant model (``deploy.compare(exact=True)``) on other
random images. A refusal is recorded with its message. Writes a markdown table to
``docs/torchvision-families.md``.

    python benchmarks/torchvision_families.py            # every family, about 10 minutes on 2 CPU cores
    python benchmarks/torchvision_families.py --only resnet18 mobilenet_v3_small
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch.nn import functional as F

from qkd.errors import QKDError
from qkd.export import IntRuntime, compare, export_onnx_int, onnx_runner, to_int_program
from qkd.quant import QuantConfig, calibrate, quantization_summary, quantize_model, recalibrate_bn

OUT = Path(__file__).resolve().parents[1] / "docs" / "torchvision-families.md"
SIZE = 64  # input side; the families' minimum where larger
CALIBRATION = 8  # images
# family -> (variant, input side, extra builder arguments)
FAMILIES: dict[str, tuple[str, int, dict]] = {
    "ResNet": ("resnet18", SIZE, {}),
    "ResNeXt": ("resnext50_32x4d", SIZE, {}),
    "MobileNetV2": ("mobilenet_v2", SIZE, {}),
    "MobileNetV3": ("mobilenet_v3_small", SIZE, {}),
    "MNASNet": ("mnasnet0_5", SIZE, {}),
    "ShuffleNetV2": ("shufflenet_v2_x0_5", SIZE, {}),
    "SqueezeNet": ("squeezenet1_0", SIZE, {}),
    "DenseNet": ("densenet121", SIZE, {}),
    "EfficientNet": ("efficientnet_b0", SIZE, {}),
    "EfficientNetV2": ("efficientnet_v2_s", SIZE, {}),
    "RegNet": ("regnet_y_400mf", SIZE, {}),
    "ConvNeXt": ("convnext_tiny", SIZE, {}),
    "ViT": ("vit_b_16", SIZE, {"image_size": SIZE}),
    "Swin": ("swin_t", SIZE, {}),
    "MaxViT": ("maxvit_t", 224, {}),  # its 7x7 partitions need 224 (32 x 7)
    "GoogLeNet": ("googlenet", SIZE, {"aux_logits": False, "init_weights": True}),
    "Inception": ("inception_v3", 80, {"aux_logits": False, "init_weights": True}),  # 75 px at least
    "AlexNet": ("alexnet", SIZE, {}),
    "VGG": ("vgg11_bn", SIZE, {}),
}
SKIPPED = {"Wide ResNet": ("wide_resnet50_2", "same ops as ResNet/ResNeXt (Bottleneck blocks), 69M parameters")}


@dataclass
class Row:
    family: str
    variant: str
    size: int
    quantized: str = "-"
    trains: str = "-"
    int_export: str = "-"
    onnx_int: str = "-"
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _reason(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text if isinstance(e, QKDError) else f"{type(e).__name__}: {text}"


def _agreement(result: dict) -> str:
    return f"{result['agreement_f64']:.0%} (max diff {result['max_logit_diff_f64']:.0e})"


def _survey(family: str, variant: str, size: int, kwargs: dict, tmp: Path) -> Row:
    row = Row(family, variant, size)
    gen = torch.Generator().manual_seed(0)
    # 8 images for statistics and calibration (with 2, a 1x1 feature map can have zero variance), 2 for training
    x, x_test = torch.randn(CALIBRATION, 3, size, size, generator=gen), torch.randn(4, 3, size, size, generator=gen)
    batches = [(x_test, torch.zeros(len(x_test), dtype=torch.long))]
    torch.manual_seed(0)
    model = torchvision.models.get_model(variant, weights=None, num_classes=10, **kwargs)
    steps = [
        ("quantized", lambda: _quantize(model, x)),
        ("trains", lambda: _train_step(model, x[:2])),
        ("int_export", lambda: _int(model, x[:2], batches)),
        ("onnx_int", lambda: _onnx_int(model, x[:2], batches, tmp)),
    ]
    for name, step in steps:
        try:
            setattr(row, name, step())
        except Exception as e:  # recorded, not raised: the table is the result
            setattr(row, name, "refused" if isinstance(e, QKDError) else "error")
            row.notes.append(f"{name.replace('_', '-')}: {_reason(e)}")
            if name in ("quantized", "trains"):
                break
    return row


def _quantize(model: torch.nn.Module, x: torch.Tensor) -> str:
    # BatchNorm statistics of the calibration images first, in float and again once quantized: with the
    # initial ones (mean 0, variance 1) a deep random network's activations grow layer after layer
    recalibrate_bn(model, [x])
    quantize_model(model, QuantConfig(weight_bits=4, act_bits=4))
    calibrate(model, x)
    recalibrate_bn(model, [x])
    summary = quantization_summary(model)
    return f"{summary.n_quantized} / {summary.n_float}"


def _train_step(model: torch.nn.Module, x: torch.Tensor) -> str:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss = F.cross_entropy(model(x), torch.tensor([1, 2]))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # a random deep network's first gradients can be huge
    opt.step()
    model.eval()
    return f"loss {loss.item():.2f}"


def _int(model: torch.nn.Module, x: torch.Tensor, batches: list) -> str:
    return _agreement(compare(IntRuntime(*to_int_program(model, x)), model, batches, exact=True))


def _onnx_int(model: torch.nn.Module, x: torch.Tensor, batches: list, tmp: Path) -> str:
    run = onnx_runner(export_onnx_int(model, x, tmp / "model.onnx"))
    return _agreement(compare(lambda t: torch.from_numpy(run(t.numpy())), model, batches, exact=True))


def _table(rows: list[Row]) -> str:
    head = ("| family | variant | input | quantized / float layers | one SGD step | int: top-1 agreement | "
            "onnx-int: top-1 agreement | s |")  # fmt: skip
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r.family} | {r.variant} | {r.size} | {r.quantized} | {r.trains} | {r.int_export} | "
                     f"{r.onnx_int} | {r.seconds:.0f} |")  # fmt: skip
    for family, (variant, why) in SKIPPED.items():
        lines.append(f"| {family} | {variant} | - | skipped: {why} | | | | |")
    notes = [f"- **{r.variant}** {note}" for r in rows for note in r.notes]
    return "\n".join(lines + ["", "Refusals and errors, as reported:", "", *notes] if notes else lines)


def _write(rows: list[Row], argv: list[str], seconds: float) -> None:
    cpus = os.cpu_count()
    text = f"""# torchvision classification families: quantization and exact export

Measured {datetime.date.today().isoformat()} on a {cpus}-core CPU ({platform.machine()}), torch {torch.__version__},
torchvision {torchvision.__version__}, in {seconds / 60:.1f} minutes:

    {" ".join(["python", f"benchmarks/{Path(__file__).name}", *argv])}

Each model: `weights=None`, 10 classes; BatchNorm statistics set on 8 random images of the side given
(`recalibrate_bn`); `quantize_model(QuantConfig(weight_bits=4, act_bits=4))` (first and last layers
8-bit); calibrated on the same images and BatchNorm statistics set again; one SGD step (batch 2, train
mode, gradient norm clipped to 1); then exported. Agreement is top-1 against the float64 fake-quant
model (`deploy.compare(exact=True)`) on 4 other random images, with the largest logit difference.
"quantized / float" counts Conv/Linear-like layers (`quantization_summary`, which lists any left float and
why). `benchmarks/transformer_qdq.py` measures the QDQ ONNX of ConvNeXt, ViT, Swin and MaxViT. Random
weights and images say nothing about accuracy: the table shows which families quantize, train and export,
and that the exports are exact.
The integer runtime holds values between layers to 2**-32: where a float64 activation lies closer than
that to a rounding boundary of the next quantizer, its code can differ by one step, which moves the
logits by up to about 0.1 without changing the top-1 (not in this run; once in a resnet18 trial on other images).

{_table(rows)}
"""
    OUT.write_text(text)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="variants to run (default: every family)")
    args = parser.parse_args(argv)
    start, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as tmp:
        for family, (variant, size, kwargs) in FAMILIES.items():
            if args.only and variant not in args.only:
                continue
            t0 = time.perf_counter()
            rows.append(_survey(family, variant, size, kwargs, Path(tmp)))
            rows[-1].seconds = time.perf_counter() - t0
            r = rows[-1]
            print(f"{variant}: {r.quantized} | {r.trains} | int {r.int_export} | onnx-int {r.onnx_int} | "
                  f"{r.seconds:.0f} s {'; '.join(r.notes)}", flush=True)  # fmt: skip
    print(_table(rows))
    if not args.only:
        _write(rows, argv, time.perf_counter() - start)
        print(f"wrote {OUT}")


if __name__ == "__main__":
    main(sys.argv[1:])
