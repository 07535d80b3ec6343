"""``qkd report``: the comparison table, the figures as PNGs, and one self-contained HTML page (the figures
inlined, no network needed to open it)."""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qkd._version import __version__
from qkd.errors import QKDError
from qkd.export.contract import write_export
from qkd.report import figures, table
from qkd.report.runs import Run

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.8em; }
.meta, .note, caption, dl { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.88em; margin: 0.6em 0; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; cursor: help; white-space: nowrap; } td { white-space: nowrap; }
td.wrap { white-space: normal; min-width: 16em; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; } figure { margin: 1em 0; } figure img { max-width: 100%; }
figcaption { color: #555; font-size: 0.9em; max-width: 60em; }
details { margin: 0.5em 0; } summary { cursor: pointer; font-weight: 600; }
dt { font-weight: 600; color: #333; } dd { margin: 0 0 0.4em 1.2em; }
"""


@dataclass
class Report:
    """What :func:`write_report` wrote."""

    html: Path
    markdown: Path
    figures: list[Path]
    text: str  # the table as printed on the terminal


def write_report(runs: Sequence[Run], out: str | Path) -> Report:
    """Write ``report.html``, ``report.md`` and the figures (``accuracy-per-epoch.png``, ``accuracy-vs-bits.png``)
    into the folder ``out``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise QKDError(f"report folder {out} is a file; choose another --out (a folder, made if missing)")
    rows = table.rows(runs)
    made: list[tuple[Path, bytes, str]] = []
    epochs = figures.accuracy_per_epoch(runs)
    made.append((out / "accuracy-per-epoch.png", figures.png(epochs), EPOCH_CAPTION))
    bits = figures.accuracy_vs_bits(runs)
    if bits is not None:
        made.append((out / "accuracy-vs-bits.png", figures.png(bits), BITS_CAPTION))
    for path, data, _ in made:
        write_export(path, data)
    md = f"# qkd report: {len(runs)} runs\n\n{table.shared_line(rows)}\n\n{table.markdown_table(rows)}\n\n" + "".join(
        f"![{p.stem}]({p.name})\n\n{caption}\n\n" for p, _, caption in made
    )
    write_export(out / "report.md", md.encode())
    write_export(out / "report.html", _page(runs, rows, made).encode())
    return Report(out / "report.html", out / "report.md", [p for p, _, _ in made], table.text_table(rows))


EPOCH_CAPTION = (
    "The student's validation top-1 % after each epoch of its quantized phases (of every phase for a float "
    "run); dotted verticals mark where a phase begins, named along them; dash-dotted lines are the teacher "
    "during co-study; dashed lines are the float student before quantization (one per run, in its colour, "
    "where runs started from different float weights). A run evaluated only at the end of each phase "
    "(runtime.eval=lean) shows one point per phase."
)
BITS_CAPTION = (
    "The final student's test top-1 % against bit-width, one line per method (the mean where several runs share "
    "a method and bit-width, each run a point); the grey dashed line is the float student (a grey band: the "
    "range of the runs' float students, where they started from different float weights)."
)


def _page(runs: Sequence[Run], rows: list[dict[str, str]], made: list[tuple[Path, bytes, str]]) -> str:
    esc = html.escape
    when = time.strftime("%Y-%m-%d %H:%M")
    legend = "".join(f"<dt>{esc(c)}</dt><dd>{esc(doc)}</dd>" for c, doc in table.COLUMNS.items())
    figs = "".join(
        f'<figure><img alt="{esc(p.stem)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
        for p, data, caption in made
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>qkd report: {len(runs)} runs</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>
<body>
<h1>qkd report: {len(runs)} run{"s" if len(runs) != 1 else ""}</h1>
<p class="meta">Made {when} by qkd {esc(__version__)} from the run folders' summary.json and metrics.jsonl.
Accuracies are top-1 % of the student; choices are made on the validation split, results are read on test.</p>
<h2>Comparison</h2>
<p class="note">{esc(table.shared_line(rows))}</p>
<div class="scroll">{table.html_table(rows)}</div>
<details><summary>What the columns mean</summary><dl>{legend}</dl></details>
<h2>Figures</h2>
{figs}
<h2>The runs</h2>
{"".join(_details(r, opened=len(runs) <= 4) for r in runs)}
</body></html>
"""


def _numbers_after(text_columns: int, columns: int) -> list[str]:
    return [""] * text_columns + ["num"] * (columns - text_columns)


def _details(run: Run, opened: bool) -> str:
    """One run: where it is, its stages, the teacher-student measurements and its exports."""
    esc, pct = html.escape, table.pct
    results = run.stage_results()
    stages = []
    for s in run.stages:
        r = results.get(s["key"], {})
        teacher = (r.get("teacher") or {}).get("test")
        stages.append([s["key"], s.get("role", "student"), "quantized" if s["quantized"] else "float",
                       str(s["epochs"]), pct(r.get("val")), pct(r.get("test")), pct(teacher) if teacher else "",
                       f"{r['wall_s']:.1f}" if "wall_s" in r else "-"])  # fmt: skip
    head = ["stage", "trains", "", "epochs", "val %", "test %", "teacher test %", "wall s"]
    parts = [table.html_grid(head, stages, _numbers_after(3, len(head)))]
    measured = (run.summary or {}).get("teacher_student") or {}
    if measured:
        body = [[stage, when, pct(m.get("teacher_acc")), pct(m.get("student_acc")), f"{m.get('kl', float('nan')):.4f}"]
                for stage, by_when in measured.items() for when, m in by_when.items()]  # fmt: skip
        parts.append("<p class='note'>Teacher and quantized student on the validation split (KL divergence of the "
                     "student from the teacher, nats): co-study should bring them closer.</p>")  # fmt: skip
        parts.append(table.html_grid(["stage", "when", "teacher val %", "student val %", "KL"], body,
                                     _numbers_after(2, 5)))  # fmt: skip
    exports = "".join(f"<li>{esc(e.path.name)}: {esc(e.format)}, {table.size(e.bytes)}</li>" for e in run.exports)
    parts.append(f"<p class='note'>Exports:</p><ul>{exports or '<li>none (qkd export writes them)</li>'}</ul>")
    s = run.summary or {}
    facts = [f"folder {run.path}", run.position]
    facts += [f"{k} {s[k]}" for k in ("device", "precision", "world_size", "batch_size") if s.get(k) is not None]
    return (
        f"<details{' open' * opened}><summary>{esc(run.name)}: {esc(run.method)} {esc(run.bits_label)}, "
        f"{esc(run.data)}, {esc(run.student)}</summary><p class='note'>{esc('; '.join(facts))}</p>"
        f"{''.join(parts)}</details>"
    )
