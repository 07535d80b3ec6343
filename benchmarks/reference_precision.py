"""How much of the export's disagreement is float32 rounding in the reference itself.

Runs a run folder's student three ways on the test split (the fake-quant model in float32, the
same model in float64, and the integer runtime) and prints the pairwise top-1 agreement and the
largest logit difference between the float64 model and the integer runtime.

    python benchmarks/reference_precision.py runs/accuracy-cpu-short/w2a2-qkd-resnet56-s0
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import typer

from qkd import pipeline
from qkd.export import IntRuntime, to_int_program


def main(run: Path, limit: int = 10_000) -> None:
    cfg = pipeline.load_run_config(run)
    cfg.runtime.channels_last = False
    r = pipeline.load_student(cfg, run, "cpu")
    m32 = r.student.eval().cpu()
    m64 = copy.deepcopy(m32).double()
    engine = IntRuntime(*to_int_program(m32))
    seen = a32_64 = a32_int = a64_int = 0
    max_diff = 0.0
    with torch.no_grad():
        for x, _ in r.data.test:
            x = x.cpu().contiguous()[: limit - seen]
            p32, o64, oi = m32(x).argmax(1), m64(x.double()), engine(x)
            a32_64 += int((p32 == o64.argmax(1)).sum())
            a32_int += int((p32 == oi.argmax(1)).sum())
            a64_int += int((o64.argmax(1) == oi.argmax(1)).sum())
            max_diff = max(max_diff, float((o64 - oi).abs().max()))
            seen += len(x)
            if seen >= limit:
                break
    print(f"{run.name}: {seen} test images; top-1 agreement: float32~float64 {a32_64 / seen:.4%}, "
          f"float32~int {a32_int / seen:.4%}, float64~int {a64_int / seen:.4%}; "
          f"max |float64 - int| logit {max_diff:.1e}")  # fmt: skip


if __name__ == "__main__":
    typer.run(main)
