"""Deploy, measured side by side: every export format in the runtime it is meant for, against its float twin.

For each trained run (CIFAR, 32 px) and each speed network (torchvision ResNet-18 / MobileNetV2 at 224 px,
random weights quantized W4A4 LSQ and calibrated on random images: latency only), every format and runtime:

| format | runtime | float twin (same runtime) |
|---|---|---|
| int (packed, ``.safetensors``) | qkd's integer runtime (torch ops) | the float network in PyTorch, eager |
| onnx-int | onnxruntime | the float network as ONNX, onnxruntime |
| onnx (QDQ) | onnxruntime, all optimizations (QDQ fused into integer kernels, as deployed) | the same float ONNX |
| onnx (QDQ) | onnxruntime with its QDQ fusion off (the file's float arithmetic: exact) | the same float ONNX |
| onnx (QDQ) | OpenVINO CPU plugin, f32 precision | the float ONNX in OpenVINO, f32 |
| executorch (``.pte``) | ExecuTorch, XNNPACK | the float network lowered to XNNPACK (fp32) |

- **size**: the file, against the float32 checkpoint (state dict) and the float file of the same runtime;
- **agreement** (trained runs): top-1 agreement of the runtime's logits with the fake-quant model evaluated
  in float64 (its exact answer) and in float32, on ``--limit`` test images (default: all 10,000);
- **latency**: batch 1 and 32, 1 and 2 threads; in each round the float twin and the quantized file run one
  after the other (the order alternating), median over the rounds of the per-round ratio quantized / float,
  and the median milliseconds of each. A round is as many runs as take the float twin about 50 ms.

Rows are kept per run/network in ``runs/deploy-bench/<name>.json`` so an interrupted benchmark resumes; the
table goes to stdout and, with ``--append``, to docs/RESULTS.md.

    python benchmarks/deployment.py runs/deploy-r20-w4a4 runs/deploy-r20-w2a2 runs/deploy-mnv2-w4a4 \
        --speed resnet18 --speed mobilenet_v2 --append
"""

from __future__ import annotations

import copy
import importlib.util
import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import typer
from common import ROOT, command_line, machine, publish

from qkd import pipeline
from qkd.export import export_student, float_checkpoint_bytes
from qkd.export.verify import float64_reference
from qkd.quant import QuantConfig, calibrate, dequantize_model, quantize_model

ROW_VERSION = 1
STORE = ROOT / "runs" / "deploy-bench"
#: (format, runtime): the file each row measures and what runs it
TARGETS = (("int", "qkd int runtime"), ("onnx-int", "onnxruntime"), ("onnx", "onnxruntime"),
           ("onnx", "onnxruntime, QDQ fusion off"), ("onnx", "openvino"), ("executorch", "executorch"))  # fmt: skip
FILES = {"int": "student-int.safetensors", "onnx-int": "student-onnx-int.onnx", "onnx": "student-onnx.onnx",
         "executorch": "student-executorch.pte"}  # fmt: skip
Run = Callable[[np.ndarray], np.ndarray]


def available(runtime: str) -> bool:
    module = {"openvino": "openvino", "executorch": "executorch"}.get(runtime)
    return module is None or importlib.util.find_spec(module) is not None


# ---------------------------------------------------------------------------------------------- runtimes
def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    if available("executorch"):
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(threads)  # XNNPACK's thread pool (no public setter in 1.5)


def ort_runner(path: Path, threads: int, fused: bool = True) -> Run:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not fused:  # the file's own float arithmetic around its Q/DQ nodes (qkd's exact check)
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def openvino_runner(path: Path, threads: int) -> Run:
    import openvino as ov

    # f32: on CPUs with AVX-512 BF16 / AMX the plugin's default precision is bf16, which moves a 4-bit model's
    # answers on ~3 % of CIFAR images (measured); f32 keeps the file's arithmetic (its integer layers stay int8)
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    return lambda x: np.array(request.infer([x])[0])


def executorch_runner(path: Path, threads: int) -> Run:
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(path)).load_method("forward")
    batch = method.metadata.input_tensor_meta(0).sizes()[0]

    def run(x: np.ndarray) -> np.ndarray:  # a program of a fixed batch size runs the images in its own batches
        outs = []
        for i in range(0, len(x), batch):
            chunk = x[i : i + batch]
            padded = np.concatenate([chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            outs.append(method.execute([torch.from_numpy(padded)])[0].numpy()[: len(chunk)])
        return np.concatenate(outs)

    return run


def int_runner(path: Path, threads: int) -> Run:
    from qkd.export import load_int

    runtime = load_int(path)[0]
    return lambda x: runtime(torch.from_numpy(x)).numpy()


def torch_runner(model: torch.nn.Module) -> Run:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    return run


def runner(runtime: str, path: Path, threads: int) -> Run:
    if runtime == "onnxruntime, QDQ fusion off":
        return ort_runner(path, threads, fused=False)
    return {"qkd int runtime": int_runner, "onnxruntime": ort_runner, "openvino": openvino_runner,
            "executorch": executorch_runner}[runtime](path, threads)  # fmt: skip


# ---------------------------------------------------------------------------------------------- files
def export_float(model: torch.nn.Module, runtime: str, folder: Path, example: torch.Tensor) -> Path | None:
    """The float twin's file for ``runtime`` (None: PyTorch eager, no file)."""
    if runtime == "qkd int runtime":
        return None
    if runtime == "executorch":
        return _float_pte(model, folder / f"float-b{len(example)}.pte", example)
    path = folder / "float.onnx"
    if not path.is_file():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "n"}})  # fmt: skip
    return path


def _float_pte(model: torch.nn.Module, path: Path, example: torch.Tensor) -> Path:
    if not path.is_file():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        program = torch.export.export(model, (example,))
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
        path.write_bytes(lowered.buffer)
    return path


def export_quant(model: torch.nn.Module, fmt: str, folder: Path, example: torch.Tensor) -> Path:
    """``model`` in ``fmt``; the ``.pte`` once per batch size (a program's input shape is fixed)."""
    name = FILES[fmt] if fmt != "executorch" else f"student-executorch-b{len(example)}.pte"
    path = folder / name
    if not path.is_file():
        export_student(model, fmt, path, example, {})
    return path


# ---------------------------------------------------------------------------------------------- measures
def agreement(run: Run, batches: list, ref32: list, ref64: list) -> dict:
    seen = agree32 = agree64 = right = 0
    for (x, y), r32, r64 in zip(batches, ref32, ref64, strict=True):
        top = run(x.numpy()).argmax(1)
        agree32 += int((top == r32.argmax(1)).sum())
        agree64 += int((top == r64.argmax(1)).sum())
        right += int((top == y.numpy()).sum())
        seen += len(y)
    return {"images": seen, "agreement": agree32 / seen, "agreement_f64": agree64 / seen, "acc": right / seen}


def latency(float_run: Run, quant_run: Run, x: np.ndarray, rounds: int, budget_s: float) -> dict:
    """Alternated rounds of the float twin and the quantized file; the rounds cut short after ``budget_s``; not
    timed where one call of either takes more than a tenth of it."""
    for run in (float_run, quant_run):
        t0 = time.perf_counter()
        run(x)
        if time.perf_counter() - t0 > budget_s / 10:
            return {"skipped": f"one call {time.perf_counter() - t0:.0f} s"}
    t0 = time.perf_counter()
    float_run(x)
    inner = max(1, round(0.05 / (time.perf_counter() - t0)))
    times: dict[str, list[float]] = {"float": [], "quant": []}
    start = time.perf_counter()
    for r in range(rounds):
        order = [("float", float_run), ("quant", quant_run)][:: 1 if r % 2 == 0 else -1]
        for key, run in order:
            t0 = time.perf_counter()
            for _ in range(inner):
                run(x)
            times[key].append((time.perf_counter() - t0) / inner)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    ratio = statistics.median(q / f for q, f in zip(times["quant"], times["float"], strict=True))
    return {"float_ms": 1e3 * statistics.median(times["float"]), "quant_ms": 1e3 * statistics.median(times["quant"]),
            "ratio": ratio, "rounds": len(times["float"])}  # fmt: skip


def measure(name: str, model: torch.nn.Module, float_model: torch.nn.Module, example: torch.Tensor, folder: Path,
            batches: list | None, args: dict) -> dict:  # fmt: skip
    """One row: sizes, agreement (``batches``: the test images; None for a speed network) and latencies."""
    row: dict = {"name": name, "float32_kib": float_checkpoint_bytes(model) / 1024, "targets": {}}
    shape = tuple(example.shape[1:])
    if batches is not None:
        with torch.no_grad():
            ref32 = [model(x).numpy() for x, _ in batches]
            model64 = float64_reference(model)
            ref64 = [model64(x).numpy() for x, _ in batches]
        right = sum(int((r.argmax(1) == y.numpy()).sum()) for r, (_, y) in zip(ref64, batches, strict=True))
        row["fake_quant_acc"] = right / sum(len(y) for _, y in batches)
    for fmt, runtime in TARGETS:
        key = f"{fmt} / {runtime}"
        if not available(runtime):
            row["targets"][key] = {"skipped": f"{runtime} is not installed"}
            continue
        entry: dict = {}
        try:
            path = export_quant(model, fmt, folder, example[:1])
            entry["kib"] = path.stat().st_size / 1024
            float_path = export_float(float_model, runtime, folder, example[:1])
            entry["float_kib"] = float_path.stat().st_size / 1024 if float_path else row["float32_kib"]
            if batches is not None:
                set_threads(2)
                entry.update(agreement(runner(runtime, path, 2), batches, ref32, ref64))
            for batch in args["batches"]:
                x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch)).numpy()
                qpath, fpath = export_quant(model, fmt, folder, example[:1].expand(batch, *shape).contiguous()), None
                fpath = export_float(float_model, runtime, folder, torch.from_numpy(x))
                for threads in args["threads"]:
                    set_threads(threads)
                    quant_run = runner(runtime, qpath, threads)
                    float_run = torch_runner(float_model) if fpath is None else runner(runtime, fpath, threads)
                    entry[f"b{batch}t{threads}"] = latency(float_run, quant_run, x, args["rounds"], args["budget_s"])
                    print(f"  {name} {key} batch {batch} threads {threads}: {entry[f'b{batch}t{threads}']}", flush=True)
        except Exception as e:  # noqa: BLE001 - a runtime that refuses a file is a result, said in the table
            entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            print(f"  {name} {key}: {entry['error']}", flush=True)
        row["targets"][key] = entry
    return row


def trained(run_dir: Path, limit: int | None) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor, list]:
    cfg = pipeline.load_run_config(run_dir)
    cfg.runtime.channels_last = False
    loaded = pipeline.load_student(cfg, run_dir, "cpu")
    model = loaded.student.eval().cpu()
    float_model = dequantize_model(pipeline.load_student(cfg, run_dir, "cpu").student).eval().cpu()  # a 2nd copy
    batches, seen = [], 0
    for x, y in loaded.data.test:
        if limit is not None and seen >= limit:
            break
        x, y = x.cpu().contiguous()[: (limit or 10**9) - seen], y.cpu()[: (limit or 10**9) - seen]
        batches.append((x, y))
        seen += len(y)
    return model, float_model, batches[0][0][:1], batches


def speed_network(name: str) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor, int]:
    """A torchvision classifier at 224 px, or a qkd model (``mobilenetv2_cifar``, ``resnet20``) at 32 px: random
    weights, W4A4 LSQ per channel, calibrated on random images."""
    import torchvision

    from qkd.models import create_model, list_models

    torch.manual_seed(0)
    ours = name in list_models()
    size = 32 if ours else 224
    float_model = (create_model(name) if ours else getattr(torchvision.models, name)(weights=None)).eval()
    model = quantize_model(copy.deepcopy(float_model), QuantConfig(weight_bits=4, act_bits=4, method="lsq",
                                                                   per_channel=True, first_last_bits=8))  # fmt: skip
    calibrate(model, torch.randn(8, 3, size, size))
    return model.eval(), float_model, torch.randn(1, 3, size, size), size


def cached(name: str, key: list, make: Callable[[], dict]) -> dict:
    path = STORE / f"{name}.json"
    if path.is_file() and json.loads(path.read_text()).get("key") == key:
        return json.loads(path.read_text())
    row = {**make(), "key": key}
    STORE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1))
    tmp.replace(path)
    return row


# ---------------------------------------------------------------------------------------------- table
def table(rows: list[dict], args: dict) -> str:
    cols = [f"b{b}t{t}" for b in args["batches"] for t in args["threads"]]
    head = " | ".join(f"batch {c[1:].split('t')[0]}, {c.split('t')[1]} thr" for c in cols)
    lines = [f"| model | format / runtime | KiB (float file KiB) | agreement f64 / f32 % | {head} |",
             "|---|---|---:|---:|" + "---:|" * len(cols)]  # fmt: skip
    for r in rows:
        for key, e in r["targets"].items():
            if "skipped" in e or ("error" in e and "kib" not in e):
                lines.append(f"| {r['name']} | {key} | {e.get('skipped') or e['error']} |" + " |" * (len(cols) + 1))
                continue
            agree = f"{100 * e['agreement_f64']:.2f} / {100 * e['agreement']:.2f}" if "agreement" in e else "—"
            cells = [_cell(e[c]) if c in e else e.get("error", "—") for c in cols]
            lines.append(f"| {r['name']} | {key} | {e['kib']:.0f} ({e['float_kib']:.0f}) | {agree} | "
                         + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines)


def _cell(t: dict) -> str:
    if "skipped" in t:
        return f"not timed ({t['skipped']})"
    return f"{t['ratio']:.2f}x ({t['quant_ms']:.1f} / {t['float_ms']:.1f} ms)"


def main(
    runs: list[Path] = typer.Argument(None, help="trained run folders (agreement + latency at their input size)"),
    speed: list[str] = typer.Option([], help="torchvision at 224 px or qkd models at 32 px, random weights: latency"),
    limit: int = typer.Option(None, help="test images for agreement (default: all)"),
    rounds: int = typer.Option(15, help="alternated rounds per latency cell (at most)"),
    budget_s: float = typer.Option(60.0, help="seconds after which a latency cell stops adding rounds"),
    batches: list[int] = typer.Option([1, 32]),
    threads: list[int] = typer.Option([1, 2]),
    append: bool = typer.Option(False, help="append the section to docs/RESULTS.md"),
) -> None:
    args = {"rounds": rounds, "budget_s": budget_s, "batches": batches, "threads": threads}
    key = [ROW_VERSION, limit, rounds, budget_s, batches, threads]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run_dir in runs or []:

            def make(run_dir=run_dir):
                model, float_model, example, test = trained(run_dir, limit)
                folder = Path(tmp) / run_dir.name
                folder.mkdir()
                return measure(run_dir.name, model, float_model, example, folder, test, args)

            rows.append(cached(run_dir.name, key, make))
        for name in speed:

            def make(name=name):
                model, float_model, example, size = speed_network(name)
                folder = Path(tmp) / name
                folder.mkdir()
                return measure(f"{name} {size}px (random W4A4)", model, float_model, example, folder, None, args)

            rows.append(cached(f"speed-{name}", key, make))
    text = (f"\n### Deploy: every format in its runtime against its float twin, {time.strftime('%Y-%m-%d')}\n\n"
            f"Machine: {machine()}.\nCommand: `{command_line()}`\n\nLatency cells: quantized / float twin of the same "
            "runtime (median of per-round ratios), then the medians in ms.\n\n" + table(rows, args) + "\n")  # fmt: skip
    publish(text, append)


if __name__ == "__main__":
    typer.run(main)
