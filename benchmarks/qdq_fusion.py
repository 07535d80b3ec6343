"""Does onnxruntime fuse qkd's QDQ ONNX into integer kernels, and how fast does it run? (issue 26, item 2)

For each network (random weights: latency and graph structure only), W4A4 LSQ per channel, calibrated on random
images, batch 1 on the CPU, every variant timed in the same rounds (a sample: the mean of as many runs as take
the float one about 50 ms), alternated, median over the rounds:

- ``float``: the float network (torch.onnx, before quantization);
- ``ort int8``: onnxruntime's own static int8 QDQ of that float network (``quantize_static``, per channel): a
  different model (8-bit, every tensor quantized), the speed reference;
- ``qkd before``: the QDQ exporter of the commit given by ``--before`` (read with ``git show``), as it wrote files;
- ``qkd``: the current exporter with ``integer_matmul=True`` (the convs onnxruntime cannot fuse as MatMulInteger),
  run as a deployment runs it (all optimizations: onnxruntime fuses what it can);
- ``qkd as written``: the same file with onnxruntime's QDQ fusions off (``run_onnx``'s default, the exact path).

For each variant also the optimized graph's integer convolutions (QLinearConv, and MatMulInteger: the head's Gemm
counts there too) and float ones (Conv, FusedConv),
from the file onnxruntime writes with ``optimized_model_filepath``.

    python benchmarks/qdq_fusion.py --rounds 40 --append
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, command_line, machine, publish  # noqa: E402

from qkd.export.onnx_qdq import export_onnx  # noqa: E402
from qkd.models import create_model  # noqa: E402
from qkd.quant import QuantConfig, calibrate, quantize_model  # noqa: E402

NETWORKS = {"resnet20": 32, "resnet18": 224, "mobilenetv2_cifar": 32}  # name -> image size


def network(name: str) -> torch.nn.Module:
    if name == "resnet18":
        import torchvision

        return torchvision.models.resnet18(weights=None)
    return create_model(name)


def old_exporter(commit: str, tmp: Path):
    """``export_onnx`` of qkd's QDQ exporter at ``commit``."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:src/qkd/export/onnx_qdq.py"],
                            check=True, capture_output=True, text=True).stdout  # fmt: skip
    path = tmp / "onnx_qdq_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("qkd_onnx_qdq_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module.export_onnx


def _ort_int8(float_path: Path, out: Path, images: np.ndarray) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_name("ort_pre.onnx")
    quant_pre_process(str(float_path), str(pre))  # BN folded, shapes inferred: what the ORT docs ask for

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": images[i : i + 1]} for i in range(len(images))])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip
    return out


def _session(path: Path, fused: bool, tmp: Path, threads: int) -> tuple[ort.InferenceSession, dict[str, int]]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0: onnxruntime's default (one per physical core)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not fused:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    options.optimized_model_filepath = str(tmp / f"{path.stem}-{fused}.opt.onnx")
    # ClipQuantRewrite off for every variant: it fails to load the old exporter's 4-bit zero points
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=["ClipQuantRewrite"])  # fmt: skip
    ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    counts = {"int": ops.count("QLinearConv") + ops.count("MatMulInteger"),
              "float": ops.count("Conv") + ops.count("FusedConv")}  # fmt: skip
    return session, counts


def measure(name: str, rounds: int, before: str, threads: int) -> list[dict]:
    size = NETWORKS[name]
    torch.manual_seed(0)
    calib = torch.randn(16, 3, size, size)
    example = calib[:1]
    float_model = network(name).eval()
    model = quantize_model(copy.deepcopy(float_model), QuantConfig(weight_bits=4, act_bits=4, method="lsq",
                                                                   per_channel=True))  # fmt: skip
    calibrate(model, calib)
    model.eval()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        float_path = tmp / "float.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(float_model, (example,), str(float_path), dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["output"])  # fmt: skip
        files = {
            "float": (float_path, True),
            "ort int8": (_ort_int8(float_path, tmp / "ort_int8.onnx", calib.numpy()), True),
            "qkd before": (old_exporter(before, tmp)(model, example, tmp / "qkd_before.onnx"), True),
            "qkd": (export_onnx(model, example, tmp / "qkd.onnx", integer_matmul=True), True),
            "qkd as written": (tmp / "qkd.onnx", False),
        }
        sessions = {k: _session(Path(p), fused, tmp, threads) for k, (p, fused) in files.items()}
        x = {"input": example.numpy()}
        for session, _ in sessions.values():
            for _ in range(5):
                session.run(None, x)
        t0 = time.perf_counter()
        sessions["float"][0].run(None, x)
        inner = max(1, round(0.05 / (time.perf_counter() - t0)))  # runs per sample: about 50 ms of the float one
        times: dict[str, list[float]] = {k: [] for k in sessions}
        names = list(sessions)
        for r in range(rounds):  # alternated: each round times every variant once, the order rotating
            for k in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                for _ in range(inner):
                    sessions[k][0].run(None, x)
                times[k].append((time.perf_counter() - t0) / inner)
        with torch.no_grad():
            ref = model(calib).numpy()
        rows = []
        base = statistics.median(times["float"])
        for k, (session, ops) in sessions.items():
            paired = statistics.median(t / f for t, f in zip(times[k], times["float"], strict=True))
            row = {"net": f"{name} {size}px", "variant": k, "ms": 1e3 * statistics.median(times[k]),
                   "ratio": statistics.median(times[k]) / base, "paired": paired, **ops}  # fmt: skip
            if k.startswith("qkd"):
                got = np.concatenate([session.run(None, {"input": calib[i : i + 1].numpy()})[0] for i in range(16)])
                row["diff"] = float(np.abs(got - ref).max() / np.abs(ref).max())
            rows.append(row)
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--before", default="fa5def1^", help="the commit of the exporter before the change")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    parser.add_argument("--append", action="store_true", help="append the section to docs/RESULTS.md")
    args = parser.parse_args()
    lines = ["| network | variant | median ms | / float (medians) | / float (median of per-round ratios) | integer "
             "| float convs | max logit diff / max logit |", "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name in args.only:
        for r in measure(name, args.rounds, args.before, args.threads):
            diff = f"{r['diff']:.1e}" if "diff" in r else ""
            lines.append(f"| {r['net']} | {r['variant']} | {r['ms']:.1f} | {r['ratio']:.2f} | {r['paired']:.2f} "
                         f"| {r['int']} | {r['float']} | {diff} |")  # fmt: skip
    text = (f"\n### QDQ ONNX: onnxruntime {ort.__version__} fusion and latency, batch 1, "
            f"{args.threads or 'default'} threads, {time.strftime('%Y-%m-%d')}\n\n"
            f"Machine: {machine()}.\nCommand: `{command_line()}`\n\n"
            + "\n".join(lines) + "\n")  # fmt: skip
    publish(text, args.append)


if __name__ == "__main__":
    main()
