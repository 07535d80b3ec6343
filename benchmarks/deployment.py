"""Export trained runs to every format (packed integers, ONNX QDQ, ONNX integer) and check them on the test split.

For each run folder and format: the file size against the float32 checkpoint, and top-1 agreement
with the fake-quant model, the largest logit difference and accuracy (the integer runtime for the
packed file, onnxruntime for the ONNX files).
The fake-quant model is evaluated as trained (float32) and in float64: where float32 rounding puts a
value on the other side of a quantization step, the float64 evaluation is the model's exact answer.

    python benchmarks/deployment.py runs/accuracy-cpu-short/w2a2-qkd-resnet56-s0 runs/deploy/mnv2-w4a4
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
import typer
from common import command_line, machine, publish

import qkd.export.onnx_int  # noqa: F401  (imported now, not halfway through a long run)
import qkd.export.onnx_qdq  # noqa: F401
from qkd import pipeline
from qkd.export import EXTENSIONS, compare, export_student, float_checkpoint_bytes

ROOT = Path(__file__).resolve().parents[1]
ROW_VERSION = 3  # 2: also against the fake-quant model evaluated in float64; 3: the onnx-int format


def check_run(run_dir: Path, limit: int | None) -> dict:
    """One run's row; kept in ``<run>/export/deployment.json`` so an interrupted benchmark resumes."""
    cached = run_dir / "export" / "deployment.json"
    if cached.is_file() and json.loads(cached.read_text()).get("key") == [limit, ROW_VERSION]:
        return json.loads(cached.read_text())
    row = _measure(run_dir, limit)
    cached.write_text(json.dumps({**row, "key": [limit, ROW_VERSION]}, indent=1))
    return row


def _measure(run_dir: Path, limit: int | None) -> dict:
    cfg = pipeline.load_run_config(run_dir)
    cfg.runtime.channels_last = False
    r = pipeline.load_student(cfg, run_dir, "cpu")
    q = cfg.quant
    row = {"run": run_dir.name, "model": cfg.student.name, "bits": f"W{q.weight_bits}A{q.act_bits}",
           "float_kib": float_checkpoint_bytes(r.student) / 1024}  # fmt: skip
    batches, seen = [], 0
    for x, y in r.data.test:
        if limit is not None and seen >= limit:
            break
        batches.append((x.cpu().contiguous(), y.cpu()))
        seen += len(y)
    example = batches[0][0][:2]
    student = r.student.eval().cpu()
    # The fake-quant logits, computed once for both formats: as trained (float32), and the same model
    # in float64, which tells the export's own error from float32 rounding in the reference.
    student64 = copy.deepcopy(student).double()
    with torch.no_grad():
        refs = {
            "": {x.data_ptr(): student(x) for x, _ in batches},
            "_f64": {x.data_ptr(): student64(x.double()) for x, _ in batches},
        }
    for fmt, ext in EXTENSIONS.items():
        path = run_dir / "export" / f"student-{fmt}.{ext}"
        t0 = time.perf_counter()
        exported = export_student(student, fmt, path, example, {"model": cfg.student.name})
        outputs = {}  # the exported model runs once per batch, for both references

        def run(x, exported=exported, outputs=outputs):
            if x.data_ptr() not in outputs:
                outputs[x.data_ptr()] = exported(x)
            return outputs[x.data_ptr()]

        row[fmt] = {"kib": path.stat().st_size / 1024}
        for suffix, ref in refs.items():
            result = compare(run, lambda x, ref=ref: ref[x.data_ptr()][: len(x)].float(), batches, limit)
            row[fmt].update({f"{k}{suffix}": v for k, v in result.items()})
        row[fmt]["seconds"] = time.perf_counter() - t0
    return row


def main(runs: list[Path], limit: int | None = None, append: bool = True) -> None:
    """Check every run; print a table, write docs/deployment.json, append to docs/RESULTS.md."""
    rows = [check_run(run, limit) for run in runs]
    lines = [
        "| run | model | bits | format | KiB (float32 KiB) | test images | agreement, float32 / float64 ref "
        "| max logit diff, float32 / float64 ref | accuracy % (fake-quant) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for fmt in EXTENSIONS:
            e = r[fmt]
            lines.append(
                f"| {r['run']} | {r['model']} | {r['bits']} | {fmt} | {e['kib']:.0f} ({r['float_kib']:.0f}) "
                f"| {e['images']} | {100 * e['agreement']:.2f} / {100 * e['agreement_f64']:.2f} % "
                f"| {e['max_logit_diff']:.1e} / {e['max_logit_diff_f64']:.1e} "
                f"| {100 * e.get('export_acc', e.get('engine_acc')):.2f} ({100 * e['fake_quant_acc']:.2f}) |"
            )
    command = command_line()
    text = (
        f"\n### Deployment: packed integers, ONNX QDQ and ONNX integer against the fake-quant model, "
        f"{time.strftime('%Y-%m-%d')}\n\nMachine: {machine()}.\nCommand: `{command.strip()}`\n\n"
        + "\n".join(lines)
        + "\n"
    )
    path = ROOT / "docs" / "deployment.json"  # rows of earlier invocations stay, by run name
    kept = [
        r for r in (json.loads(path.read_text()) if path.is_file() else []) if r["run"] not in {x["run"] for x in rows}
    ]
    path.write_text(json.dumps(kept + rows, indent=1))
    publish(text, append)


if __name__ == "__main__":
    typer.run(main)
