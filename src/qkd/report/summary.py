"""Text of what a run and a read-back model are: the table printed at the end of a run (``qkd run``), and the
line that says which model ``qkd eval``/``qkd export`` read."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pct(value: float | None) -> str:
    """A fraction as a percentage in 6 characters (``" 91.25"``), or ``-``."""
    return "-" if value is None else f"{100 * value:6.2f}"


def format_summary(summary: dict) -> str:
    """The table printed at the end of a run: accuracies (%) on the validation and test splits."""
    stages = summary.get("stages", {})
    rows = [("", "epochs", "val %", "test %", "teacher test %", "wall s", "")]
    for who in ("teacher", "student"):
        if f"{who}_fp" in summary:
            fp, trained = summary[f"{who}_fp"], stages.get(f"fp_{who}", {})
            wall = f"{trained['wall_s']:.1f}" if trained else ""
            rows.append((f"{who} FP ({summary[who]})", str(trained.get("epochs", 0)), pct(fp.get("val")),
                         pct(fp.get("test")), "", wall, _chance(trained)))  # fmt: skip
    bits = summary["bits"]
    for key, r in stages.items():
        if r["quantized"]:
            at = "mixed bits" if bits["weight"] == "mixed" else f"W{bits['weight'] or 'f'}A{bits['act'] or 'f'}"
            label = f"student {at} after {key}"
            teacher = pct(r["teacher"].get("test")) if "teacher" in r else ""
            rows.append((label, str(r["epochs"]), pct(r.get("val")), pct(r.get("test")), teacher,
                         f"{r['wall_s']:.1f}", _chance(r)))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i in (0, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        for row in rows
    ]
    lines[1:1] = ["-" * max(len(ln) for ln in lines)]
    if summary.get("at_chance"):
        lines.append(f"AT CHANCE: {', '.join(summary['at_chance'])} ended at chance accuracy: that model learned "
                     "nothing (check the learning rate, the data and the checkpoint)")  # fmt: skip
    return "\n".join(lines)


def _chance(result: dict) -> str:
    return "<- at chance" if result.get("at_chance") else ""


def finished_run(run_dir: Path, summary: dict) -> str:
    """What ``qkd run`` prints at the end: the table, and where the run folder is."""
    return (f"{format_summary(summary)}\n\nrun folder: {run_dir}  (summary.json, metrics.jsonl, checkpoints/; "
            f"compare runs: qkd report {run_dir.parent})")  # fmt: skip


def describe_loaded(r: Any) -> str:
    """What was read (a :class:`~qkd.trained.LoadedModel`): which model, at which bits, from which state of the run."""
    q = r.cfg.quant
    edges = f"{q.first_last_bits} bits" if q.first_last_bits else "as the rest"
    bits = f"W{q.weight_bits}A{q.act_bits} fake-quant (first/last layers {edges})"
    if q.budget is not None:
        bits = f"fake-quant at mixed bits {q.budget.bits} chosen within quant.budget.{q.budget.unit}"
    how = bits if r.quantized else "float"
    state = "at the end of the run" if r.where == "the end of the run" else r.where
    state = state if state.startswith(("at ", "after ")) else f"UNFINISHED, stopped at {state}"
    return f"the {r.role} {getattr(r.cfg, r.role).name}, {how}, {state}"
