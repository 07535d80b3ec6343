"""ExecuTorch (.pte, XNNPACK): latency of qkd's quantized program against the float one, and agreement (issue 26).

Latency: torchvision ResNet-18 at 224 px (random weights: speed only), W4A4 LSQ per channel calibrated on random
images, written by ``qkd.export_model(..., "executorch")`` with batch 1; the float network lowered to XNNPACK in
fp32 the same way. ExecuTorch's thread pool at 1 thread; both programs timed in the same rounds, alternated (each
sample the mean of ``--runs`` calls), median over ``--rounds``. Also the file sizes and which layers run in int8.
``--pt2e`` adds ExecuTorch's own static int8 flow on the float network (every conv output quantized, 8-bit,
calibrated afresh: a different model) as the speed XNNPACK's int8 reaches.

Agreement (``--cifar``): CIFAR ResNet-20 from the pretrained weights of ../shared/data, W4A4 LSQ calibrated on 256
training images (no training: the point is the export against its own fake-quant model), on ``--images`` test images.

    python benchmarks/pte_latency.py --rounds 30 --runs 5 --pt2e --cifar --images 1000 --out docs/pte-latency.json
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA_DIR, command_line, machine  # noqa: E402

import qkd  # noqa: E402
from qkd.quant import QuantConfig, calibrate, quantize_model  # noqa: E402


def _float_pte(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    ep = torch.export.export(model.eval(), (example,))
    path.write_bytes(to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)


def _pt2e_int8_pte(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """ExecuTorch's own static int8 flow on the float network (PT2E, XNNPACKQuantizer, per channel, calibrated on
    random images): every conv's output quantized, a different (8-bit) model; the speed XNNPACK's int8 reaches."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from executorch.exir import to_edge_transform_and_lower
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(torch.export.export(model.eval(), (example,)).module(), quantizer)
    with torch.no_grad():
        for _ in range(4):
            prepared(torch.randn_like(example))
    ep = torch.export.export(convert_pt2e(prepared), (example,))
    path.write_bytes(to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)


def _method(path: Path):
    from executorch.runtime import Runtime

    return Runtime.get().load_program(path).load_method("forward")


def _timed(method, x: torch.Tensor, runs: int) -> float:
    start = time.perf_counter()
    for _ in range(runs):
        method.execute([x])
    return (time.perf_counter() - start) / runs


def latency(rounds: int, runs: int, tmp: Path, pt2e: bool) -> dict:
    """ResNet-18 224 px, batch 1, 1 thread: float .pte and qkd's W4A4 .pte (and ExecuTorch's own int8, ``pt2e``),
    alternated."""
    import torchvision

    # the only way ExecuTorch 1.5 gives Python to size its thread pool
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool  # noqa: PLC2701

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    _float_pte(net, x, tmp / "float.pte")
    if pt2e:
        _pt2e_int8_pte(copy.deepcopy(net), x, tmp / "pt2e_int8.pte")
    quantize_model(net, QuantConfig(weight_bits=4, act_bits=4, per_channel=True))
    calibrate(net, torch.randn(8, 3, 224, 224))
    start = time.perf_counter()
    qkd.export_model(net.eval(), "executorch", tmp / "w4a4.pte", x)
    export_s = time.perf_counter() - start
    from qkd.export import open_export

    contract = open_export(tmp / "w4a4.pte")[1]
    _unsafe_reset_threadpool(1)
    methods = {"float": _method(tmp / "float.pte"), "w4a4": _method(tmp / "w4a4.pte")}
    if pt2e:
        methods["pt2e_int8"] = _method(tmp / "pt2e_int8.pte")
    for m in methods.values():  # warm-up
        _timed(m, x, 3)
    samples: dict[str, list[float]] = {k: [] for k in methods}
    for r in range(rounds):
        for k in list(methods)[:: 1 if r % 2 == 0 else -1]:  # alternate the order round by round
            samples[k].append(_timed(methods[k], x, runs))
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        **{f"{k}_ms": 1000 * v for k, v in med.items()},
        **{f"{k}_ratio": v / med["float"] for k, v in med.items() if k != "float"},
        **{f"{k}_bytes": (tmp / f"{k}.pte").stat().st_size for k in med},
        "int8_layers": contract["int8_layers"],
        "layers": contract["layers"],
        "not_int8": contract["not_int8"],
        "portable_ops": contract["portable_ops"],
        "export_s": export_s,
    }


def cifar_agreement(images: int, tmp: Path) -> dict:
    """CIFAR ResNet-20 (pretrained), W4A4 LSQ calibrated: the .pte against its fake-quant model."""
    from qkd.models import create_model
    from qkd.models.registry import load_pretrained

    test = np.load(DATA_DIR / "cifar10-jpeg-test.npz")
    train = np.load(DATA_DIR / "cifar10-jpeg-train.npz")
    mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)

    def prep(x: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - mean) / std

    pick = np.random.default_rng(0).permutation(len(test["y"]))[:images]
    x, y = prep(test["x"][pick]), torch.from_numpy(test["y"][pick])
    net = create_model("resnet20")
    load_pretrained(net, DATA_DIR / "weights" / "resnet20-12fca82f.th")
    quantize_model(net, QuantConfig(weight_bits=4, act_bits=4, per_channel=True))
    calibrate(net, prep(train["x"][np.random.default_rng(1).permutation(len(train["y"]))[:256]]))
    net.eval()
    run = qkd.export_model(net, "executorch", tmp / "resnet20.pte", x[:2])
    with torch.no_grad():
        ref = net(x)
    out = run(x)
    from qkd.export import open_export

    contract = open_export(tmp / "resnet20.pte")[1]
    return {
        "images": images,
        "agreement": float((out.argmax(1) == ref.argmax(1)).float().mean()),
        "max_logit_diff": float((out - ref).abs().max()),
        "pte_acc": float((out.argmax(1) == y).float().mean()),
        "fake_quant_acc": float((ref.argmax(1) == y).float().mean()),
        "int8_layers": contract["int8_layers"],
        "layers": contract["layers"],
    }


def main(
    rounds: int = 30,
    runs: int = 5,
    pt2e: bool = False,
    cifar: bool = False,
    images: int = 1000,
    out: Path | None = None,
) -> None:
    """Print (and with ``--out`` write) the figures as JSON."""
    torch.set_num_threads(1)
    result: dict = {"command": command_line(), "machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        result["resnet18_224"] = latency(rounds, runs, Path(tmp), pt2e)
        if cifar:
            result["resnet20_cifar"] = cifar_agreement(images, Path(tmp))
    text = json.dumps(result, indent=1)
    print(text)
    if out is not None:
        out.write_text(text + "\n")


if __name__ == "__main__":
    typer.run(main)
