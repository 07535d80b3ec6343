"""The comparison table of runs: one row per run, as plain text (terminal), Markdown and HTML."""

from __future__ import annotations

import html
from collections.abc import Sequence

from qkd.report.runs import Run

#: column name -> what it means (the HTML page shows these as the headers' tooltips and under the table)
COLUMNS = {
    "run": "the run folder's name",
    "method": "qkd, or a baseline (qat, kd, ss+tu, cs+tu)",
    "bits": "weights and activations of the quantized layers (first and last layers may differ, see the run)",
    "data": "the data set",
    "student": "the student model",
    "float %": "the float student before quantization, test top-1 %",
    "per phase, test %": "the student at the end of each phase, test top-1 % (val where no test was measured)",
    "val %": "the final student, validation top-1 % (the split choices are made on)",
    "test %": "the final student, test top-1 %",
    "vs float": "final test minus float test, points",
    "int export": "size of the integer file written by qkd export (times smaller than a float32 checkpoint)",
    "wall": "training and evaluation time of all its stages",
    "status": "finished, or where an unfinished run stands; stages that ended at chance accuracy",
}


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _wall(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 2**20 else f"{n / 2**20:.2f} MiB"


def _phases(run: Run) -> str:
    results = run.stage_results()
    parts = []
    for s in run.curve_stages():
        r = results.get(s["key"])
        if r is None:
            continue
        value = f"{pct(r['test'])}" if r.get("test") is not None else f"val {pct(r.get('val'))}"
        parts.append(f"{s['phase'].replace('_', '-') if s['quantized'] else 'float training'} {value}")
    return " → ".join(parts) or "-"


def _export(run: Run) -> str:
    ints = [e for e in run.exports if e.format == "int"]
    if not ints:
        return "-"
    e = ints[0]
    return size(e.bytes) + (f" ({e.float32_bytes / e.bytes:.1f}x)" if e.float32_bytes else "")


def _status(run: Run) -> str:
    chance = (run.summary or {}).get("at_chance") or []
    return run.position + (f"; AT CHANCE: {', '.join(chance)}" if chance else "")


def rows(runs: Sequence[Run]) -> list[dict[str, str]]:
    """One row per run, the values as they are shown (``COLUMNS`` order)."""
    out = []
    for r in runs:
        test, fp = r.final("test"), r.float_reference("test")
        out.append({
            "run": r.name,
            "method": r.method,
            "bits": r.bits_label,
            "data": r.data,
            "student": r.student,
            "float %": pct(fp),
            "per phase, test %": _phases(r),
            "val %": pct(r.final("val")),
            "test %": pct(test),
            "vs float": "-" if test is None or fp is None else f"{100 * (test - fp):+.2f}",
            "int export": _export(r),
            "wall": _wall(r.wall_s),
            "status": _status(r),
        })  # fmt: skip
    return out


def shared(table: list[dict[str, str]]) -> dict[str, str]:
    """The data set and model where every run of several has the same: said once above the table, not per row."""
    if len(table) < 2:
        return {}
    return {c: table[0][c] for c in ("data", "student") if len({r[c] for r in table}) == 1}


def shared_line(table: list[dict[str, str]]) -> str:
    same = shared(table)
    return "All runs: " + ", ".join(f"{c} {v}" for c, v in same.items()) if same else ""


def _columns(table: list[dict[str, str]]) -> list[str]:
    same = shared(table)
    return [c for c in COLUMNS if c not in same]


_RIGHT = {"float %", "val %", "test %", "vs float", "int export", "wall"}
_CLASS = {"per phase, test %": "wrap", "status": "wrap"}  # long cells: may wrap in HTML


def text_table(table: list[dict[str, str]]) -> str:
    """Aligned columns for a terminal, under the line of what all runs share."""
    cols = _columns(table)
    widths = {c: max(len(c), *(len(r[c]) for r in table)) for c in cols}

    def line(r: dict[str, str]) -> str:
        return "  ".join(r[c].rjust(widths[c]) if c in _RIGHT else r[c].ljust(widths[c]) for c in cols)

    head = line({c: c for c in cols}).rstrip()
    return "\n".join([*filter(None, [shared_line(table)]), head, "-" * len(head), *(line(r).rstrip() for r in table)])


def markdown_table(table: list[dict[str, str]]) -> str:
    cols = _columns(table)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" if c in _RIGHT else "---" for c in cols) + "|"]
    lines += ["| " + " | ".join(r[c].replace("|", "\\|") for c in cols) + " |" for r in table]
    return "\n".join(lines)


def html_table(table: list[dict[str, str]]) -> str:
    cols = _columns(table)
    classes = [_CLASS.get(c, "num" if c in _RIGHT else "") for c in cols]
    return html_grid(cols, [[r[c] for c in cols] for r in table], classes, [COLUMNS[c] for c in cols])


def html_grid(head: list[str], body: list[list[str]], classes: list[str], titles: list[str] | None = None) -> str:
    """An HTML table of already formatted values: ``classes`` per column (``num`` right-aligns, ``wrap`` may wrap),
    ``titles`` the headers' tooltips."""
    esc = html.escape
    th = "".join(f'<th title="{esc(t)}">{esc(h)}</th>' if t else f"<th>{esc(h)}</th>"
                 for h, t in zip(head, titles or [""] * len(head)))  # fmt: skip
    tr = "".join("<tr>" + "".join(f'<td class="{k}">{esc(v)}</td>' for v, k in zip(row, classes)) + "</tr>"
                 for row in body)  # fmt: skip
    return f"<table><thead><tr>{th}</tr></thead><tbody>{tr}</tbody></table>"
