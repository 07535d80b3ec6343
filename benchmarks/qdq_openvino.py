"""Does OpenVINO run qkd's QDQ ONNX in integers? (issue 26, item 2, the OpenVINO check)

Two steps, because OpenVINO is not one of qkd's dependencies and need not share its environment:

    python benchmarks/qdq_openvino.py write DIR      # qkd's environment: float / qkd before / qkd files
    python benchmarks/qdq_openvino.py measure DIR    # any Python with openvino and numpy

``write`` builds the networks of ``qdq_fusion.py`` (random weights, W4A4 LSQ per channel, calibrated on random
images) and writes the float network, the QDQ file of the exporter at ``--before`` and the current one.
``measure`` compiles each for OpenVINO's CPU plugin (1 inference thread, 1 stream), counts the convolutions of the
compiled (runtime) model by the precision they run in, and times batch 1, every file in each round (order
rotating), median of the per-round ratios to the float network; and the QDQ files' logits against the fake-quant
model's on 16 random images.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import numpy as np

NETWORKS = {"resnet20": 32, "resnet18": 224}
VARIANTS = ["float", "before", "qkd"]


def write(out: Path, before: str) -> None:
    import copy
    import warnings

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from qdq_fusion import network, old_exporter

    from qkd.export.onnx_qdq import export_onnx
    from qkd.quant import QuantConfig, calibrate, quantize_model

    out.mkdir(parents=True, exist_ok=True)
    old = old_exporter(before, out)
    for name, size in NETWORKS.items():
        torch.manual_seed(0)
        float_model = network(name).eval()
        calib = torch.randn(16, 3, size, size)
        model = quantize_model(copy.deepcopy(float_model), QuantConfig(weight_bits=4, act_bits=4, method="lsq",
                                                                       per_channel=True))  # fmt: skip
        calibrate(model, calib)
        model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(float_model, (calib[:1],), str(out / f"{name}_float.onnx"), dynamo=False,
                              opset_version=17, input_names=["input"], output_names=["output"])  # fmt: skip
        with torch.no_grad():  # the fake-quant answers on 16 other random images, for the agreement
            x = torch.randn(16, 3, size, size)
            np.save(out / f"{name}_x.npy", x.numpy())
            np.save(out / f"{name}_fake_quant.npy", model(x).numpy())
        old(model, calib[:1], out / f"{name}_before.onnx")
        export_onnx(model, calib[:1], out / f"{name}_qkd.onnx")


def measure(out: Path, rounds: int) -> None:
    import openvino as ov

    core = ov.Core()
    print(f"OpenVINO {ov.__version__}; `python benchmarks/qdq_openvino.py measure DIR --rounds {rounds}`")
    print(
        "| network | file | convolutions by runtime precision | median ms | / float (median of per-round ratios) "
        "| max logit diff / max logit, top-1 agreement with fake-quant (16 random images) |"
    )
    print("|---|---|---|---:|---:|---|")
    for name, size in NETWORKS.items():
        compiled, precisions, agreement = {}, {}, {"float": ""}
        for v in VARIANTS:
            c = core.compile_model(core.read_model(str(out / f"{name}_{v}.onnx")), "CPU",
                                   {"INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1})  # fmt: skip
            count = collections.Counter()
            for op in c.get_runtime_model().get_ops():
                info = op.get_rt_info()
                if "layerType" in info and info["layerType"].astype(str) == "Convolution":
                    count[info["runtimePrecision"].astype(str)] += 1
            compiled[v], precisions[v] = c.create_infer_request(), dict(count)
            if v != "float":
                xs, ref = np.load(out / f"{name}_x.npy"), np.load(out / f"{name}_fake_quant.npy")
                got = np.concatenate([compiled[v].infer({0: xs[i : i + 1]})[0] for i in range(len(xs))])
                diff, top1 = np.abs(got - ref).max() / np.abs(ref).max(), (got.argmax(1) == ref.argmax(1)).mean()
                agreement[v] = f"{diff:.1e}, top-1 {top1:.2f}"
        x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
        for r in compiled.values():
            for _ in range(5):
                r.infer({0: x})
        t0 = time.perf_counter()
        compiled["float"].infer({0: x})
        inner = max(1, round(0.05 / (time.perf_counter() - t0)))
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for k in range(rounds):
            for v in VARIANTS[k % 3 :] + VARIANTS[: k % 3]:
                t0 = time.perf_counter()
                for _ in range(inner):
                    compiled[v].infer({0: x})
                times[v].append((time.perf_counter() - t0) / inner)
        for v in VARIANTS:
            ratio = statistics.median(a / b for a, b in zip(times[v], times["float"], strict=True))
            ms = 1e3 * statistics.median(times[v])
            print(f"| {name} {size}px | {v} | {precisions[v]} | {ms:.2f} | {ratio:.2f} | {agreement[v]} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["write", "measure"])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--before", default="fa5def1^", help="the commit of the exporter before the change")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    write(args.dir, args.before) if args.step == "write" else measure(args.dir, args.rounds)


if __name__ == "__main__":
    main()
