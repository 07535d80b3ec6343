"""Training-step throughput: float vs qkd's quantization-aware steps vs Brevitas and torch.ao.

All variants live in one process and are timed in alternation (round-robin), so that the noise of a
shared machine hits them alike; each row reports the median over the rounds and its ratio to the
float step. A step is forward + backward + SGD step on one batch of CIFAR-sized images
(ResNet-20, batch 128 by default); the co-study step also trains a ResNet-56 teacher, the tutor step
runs it forward only.

    python benchmarks/throughput.py                 # CPU, writes docs/throughput.json, appends docs/RESULTS.md
    python benchmarks/throughput.py --device cuda --amp

Peers need the optional extra: ``pip install -e .[bench]`` (Brevitas; torch.ao ships with torch).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import typer
from common import ROOT, command_line, machine
from torch import nn
from torch.nn import functional as F

from qkd.data import TensorLoader
from qkd.models import create_model
from qkd.phases import CoStudy, SelfStudy, Tutor
from qkd.quant import QuantConfig, calibrate, quantize_model
from qkd.quant.ste import set_kernel_backend
from qkd.train.loop import Runtime

Step = Callable[[], None]


@dataclass
class Variant:
    name: str
    step: Step
    note: str = ""


# ----- our variants ------------------------------------------------------------------------------------
def _place(model: nn.Module, rt: Runtime) -> nn.Module:
    return model.to(rt.device, memory_format=torch.channels_last if rt.channels_last else torch.preserve_format)


def _student(rt: Runtime, x: torch.Tensor, bits: int | None, method: str = "lsq") -> nn.Module:
    model = _place(create_model("resnet20"), rt)
    if bits is not None:
        _place(quantize_model(model, QuantConfig(weight_bits=bits, act_bits=bits, method=method)), rt)
        calibrate(model, x)
    return model


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def _phase_step(phase, x, y, rt: Runtime) -> Step:
    def step() -> None:
        with rt.autocast():
            phase.step(x, y)

    phase.train_mode()
    return step


def ours(rt: Runtime, x, y) -> list[Variant]:
    variants = [Variant("float ResNet-20", _phase_step(_self_study(_student(rt, x, None)), x, y, rt), "reference")]
    for method in ("lsq", "interval"):
        for bits in (4, 2):
            phase = _self_study(_student(rt, x, bits, method))
            variants.append(Variant(f"qkd W{bits}A{bits} {method}", _phase_step(phase, x, y, rt), "QAT step"))
    teacher = _place(create_model("resnet56"), rt)
    student = _student(rt, x, 4)
    opts = {"student": _sgd(student), "teacher": _sgd(teacher)}
    variants.append(Variant("qkd co-study W4A4", _phase_step(CoStudy(student, teacher, opts), x, y, rt),
                            "ResNet-56 teacher trains too"))  # fmt: skip
    variants.append(Variant("qkd tutor W4A4", _phase_step(Tutor(student, teacher, opts), x, y, rt),
                            "ResNet-56 teacher forward only"))  # fmt: skip

    def teacher_forward() -> None:
        with torch.inference_mode(), rt.autocast():
            teacher.eval()(x)

    variants.append(Variant("ResNet-56 teacher forward", teacher_forward, "inference mode"))
    return variants


def layouts_and_kernels(rt: Runtime, x, y) -> list[Variant]:
    """The same steps without channels_last, and with eager (uncompiled) fake-quant kernels."""
    nchw = Runtime(rt.device, False, rt.amp)
    xn = x.contiguous()
    eager_phase = _self_study(_student(rt, x, 4))
    eager_step = _phase_step(eager_phase, x, y, rt)

    def eager() -> None:
        set_kernel_backend("eager")
        try:
            eager_step()
        finally:
            set_kernel_backend("compiled")

    return [
        Variant("float ResNet-20 (NCHW)", _phase_step(_self_study(_student(nchw, xn, None)), xn, y, nchw), "layout"),
        Variant("qkd W4A4 lsq (NCHW)", _phase_step(_self_study(_student(nchw, xn, 4)), xn, y, nchw), "layout"),
        Variant("qkd W4A4 lsq (eager kernels)", eager, "no torch.compile"),
    ]


def _self_study(model: nn.Module) -> SelfStudy:
    return SelfStudy(model, None, {"student": _sgd(model)})


# ----- peers ---------------------------------------------------------------------------------------------
def _swap(model: nn.Module, make: Callable[[str, nn.Module], nn.Module | None]) -> nn.Module:
    for name, module in list(model.named_modules()):
        new = make(name, module)
        if new is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def brevitas_resnet20(bits: int) -> nn.Module:
    """ResNet-20 with Brevitas QuantConv2d/QuantLinear (weights) and QuantReLU (activations)."""
    from brevitas import nn as qnn

    def make(name: str, m: nn.Module) -> nn.Module | None:
        if type(m) is nn.Conv2d:
            return qnn.QuantConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                                   bias=m.bias is not None, weight_bit_width=bits)  # fmt: skip
        if type(m) is nn.Linear:
            return qnn.QuantLinear(m.in_features, m.out_features, bias=True, weight_bit_width=bits)
        if type(m) is nn.ReLU:
            return qnn.QuantReLU(bit_width=bits)
        return None

    return _swap(create_model("resnet20"), make)


class _AOQuantLayer(nn.Module):
    """A Conv2d/Linear whose weight and input pass through torch.ao's _LearnableFakeQuantize (LSQ-style)."""

    def __init__(self, layer: nn.Module, bits: int) -> None:
        from torch.ao.quantization import MovingAverageMinMaxObserver
        from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize as LFQ  # noqa: PLC2701 - torch.ao's own, the peer measured

        super().__init__()
        self.layer = layer
        half = 2 ** (bits - 1)
        self.w_fq = LFQ(MovingAverageMinMaxObserver, quant_min=-half, quant_max=half - 1, use_grad_scaling=True,
                        dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)  # fmt: skip
        self.a_fq = LFQ(MovingAverageMinMaxObserver, quant_min=-half, quant_max=half - 1, use_grad_scaling=True,
                        dtype=torch.qint8)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w_fq(self.layer.weight)
        x = self.a_fq(x)
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, w, self.layer.bias)
        return F.linear(x, w, self.layer.bias)


def torchao_resnet20(bits: int, x: torch.Tensor) -> nn.Module:
    model = _swap(create_model("resnet20"),
                  lambda n, m: _AOQuantLayer(m, bits) if type(m) in (nn.Conv2d, nn.Linear) else None)  # fmt: skip
    with torch.no_grad():
        model(x)  # observers set the initial scales, then the scales learn
    for m in model.modules():
        if hasattr(m, "enable_param_learning"):
            m.enable_param_learning()
    return model


def peers(rt: Runtime, x, y) -> list[Variant]:
    """Each peer in both layouts: the comparison takes its faster one."""
    found = []
    builders = {
        "Brevitas W4A4": (lambda: brevitas_resnet20(4), "QuantConv2d + QuantReLU, per-tensor weights"),
        "torch.ao W4A4": (lambda: torchao_resnet20(4, x.cpu()), "_LearnableFakeQuantize on weights and inputs"),
    }
    for name, (build, note) in builders.items():
        for layout_rt, suffix in ((rt, ""), (Runtime(rt.device, False, rt.amp), " (NCHW)")):
            try:
                model = _place(build(), layout_rt)
            except ImportError as e:
                print(f"skipping {name}: {e} (pip install -e .[bench])", file=sys.stderr)
                break
            xx = x.contiguous() if suffix else x
            found.append(Variant(name + suffix, _phase_step(_self_study(model), xx, y, layout_rt), note))
    return found


# ----- timing ----------------------------------------------------------------------------------------------
def _sync(rt: Runtime) -> None:
    if rt.device.type == "cuda":
        torch.cuda.synchronize()


def time_round_robin(variants: list[Variant], rounds: int, warmup: int, rt: Runtime) -> dict[str, list[float]]:
    """Seconds per step of each variant, alternating variants within every round."""
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(warmup + rounds):
        for v in variants:
            _sync(rt)
            t0 = time.perf_counter()
            v.step()
            _sync(rt)
            if r >= warmup:
                times[v.name].append(time.perf_counter() - t0)
    return times


def data_pipeline(rt: Runtime, n: int = 50_000, batch: int = 128, epochs: int = 3) -> float:
    """Images per second through shuffle, random crop, flip and normalisation (TensorLoader)."""
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (n,))
    loader = TensorLoader(x, y, batch_size=batch, shuffle=True, augment=True, crop_padding=4, flip=True,
                          mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), device=rt.device)  # fmt: skip
    best = 0.0
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        _sync(rt)
        t0 = time.perf_counter()
        for batch_ in loader:
            rt.batch(batch_)
        _sync(rt)
        best = max(best, n / (time.perf_counter() - t0))
    return best


def table(times: dict[str, list[float]], notes: dict[str, str], batch: int, data_ips: float) -> str:
    base = statistics.median(times["float ResNet-20"])
    rows = ["| variant | median ms / step | images / s | ratio to float | note |", "|---|---:|---:|---:|---|"]
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(f"| {name} | {1000 * med:.0f} | {batch / med:,.0f} | {med / base:.2f}x | {notes[name]} |")
    rows.append(f"| data pipeline (crop, flip, normalise) | | {data_ips:,.0f} | | TensorLoader, batch {batch} |")
    return "\n".join(rows)


def derived(times: dict[str, list[float]]) -> dict[str, float]:
    """The issue's targets as ratios of medians measured in the same run."""
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"w4a4_lsq_over_float": med["qkd W4A4 lsq"] / med["float ResNet-20"]}
    out["tutor_over_qat_plus_teacher_fwd"] = med["qkd tutor W4A4"] / (
        med["qkd W4A4 lsq"] + med["ResNet-56 teacher forward"]
    )
    for peer in ("Brevitas W4A4", "torch.ao W4A4"):
        best = min((v for k, v in med.items() if k.startswith(peer)), default=None)
        if best is not None:
            out[f"{peer} (faster layout) / ours W4A4"] = best / med["qkd W4A4 lsq"]
    return {k: round(v, 3) for k, v in out.items()}


def main(
    device: str = "cpu",
    batch_size: int = 128,
    rounds: int = 10,
    warmup: int = 3,
    kernels: str = "compiled",
    channels_last: bool = True,
    amp: bool = False,
    with_peers: bool = True,
    json_out: Path = ROOT / "docs" / "throughput.json",
    results_md: Path = ROOT / "docs" / "RESULTS.md",
    append: bool = True,
) -> None:
    """Time every variant side by side; print the table, write JSON, append to docs/RESULTS.md."""
    torch.manual_seed(0)
    set_kernel_backend(kernels)
    rt = Runtime(torch.device(device), channels_last, amp)
    x, y = rt.batch((torch.randn(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,))))
    variants = ours(rt, x, y) + layouts_and_kernels(rt, x, y) + (peers(rt, x, y) if with_peers else [])
    times = time_round_robin(variants, rounds, warmup, rt)
    data_ips = data_pipeline(rt, batch=batch_size)
    notes = {v.name: v.note for v in variants}
    tab = table(times, notes, batch_size, data_ips)
    summary = derived(times)
    command = command_line()
    header = (
        f"### Training-step throughput, {time.strftime('%Y-%m-%d')}\n\n"
        f"Machine: {machine()}. Device {device}, kernels {kernels}, channels_last {channels_last}, amp {amp}; "
        f"ResNet-20 batch {batch_size}, median of {rounds} alternating rounds after {warmup} warm-up rounds.\n"
        f"Command: `{command.strip()}`\n"
    )
    text = f"{header}\n{tab}\n\nDerived ratios (same run): {json.dumps(summary)}\n"
    print(text)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps({"machine": machine(), "command": command, "device": device, "kernels": kernels,
                                    "channels_last": channels_last, "amp": amp, "batch_size": batch_size,
                                    "seconds": times, "data_images_per_s": data_ips, "derived": summary},
                                   indent=2))  # fmt: skip
    if append:
        with open(results_md, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    typer.run(main)
