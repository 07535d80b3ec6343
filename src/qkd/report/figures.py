"""Figures of runs and studies, drawn with matplotlib's object API (no pyplot: no global state, no display).

The building blocks (:func:`bits_plot`, :func:`curves_plot`, :func:`intervals_plot`, :func:`series_plot`)
draw on an axes; ``qkd report``, ``benchmarks/study.py`` and ``benchmarks/accuracy.py`` all go through
them, so a figure means the same thing wherever it appears. :func:`accuracy_per_epoch` and
:func:`accuracy_vs_bits` are the report's two figures of a set of runs.
"""

from __future__ import annotations

import io
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from qkd.phases import METHODS
from qkd.report.runs import Run

#: one colour per method, the same in every figure
METHOD_COLOURS = {m: f"C{i}" for i, m in enumerate(METHODS)}
DPI = 120


def method_colour(method: str) -> str:
    """A method's colour; an explicit phase list gets one of the colours no method has (the same every time)."""
    spare = 10 - len(METHOD_COLOURS)
    return METHOD_COLOURS.get(method, f"C{len(METHOD_COLOURS) + sum(map(ord, method)) % spare}")


def figure(panels: int = 1, size: tuple[float, float] = (6.5, 4.0), columns: int = 2) -> tuple[Figure, list[Axes]]:
    """A figure of ``panels`` axes (each ``size`` inches), ``columns`` to a row; unused cells are hidden."""
    cols = min(panels, columns)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG atomically (a failed write leaves an earlier file as it was)."""
    from qkd.export.contract import write_export

    write_export(path, png(fig))
    return Path(path)


# ----- building blocks --------------------------------------------------------------------------
@dataclass
class Reference:
    """A horizontal line (e.g. the float model's accuracy), or a band up to ``high`` where it is a range."""

    label: str
    value: float
    colour: str = "gray"
    high: float | None = None


def _references(ax: Axes, references: Sequence[Reference]) -> list:
    return [ax.axhspan(r.value, r.high, color=r.colour, alpha=0.2, label=r.label) if r.high is not None
            else ax.axhline(r.value, color=r.colour, linestyle="--", linewidth=1, label=r.label)
            for r in references]  # fmt: skip


def bits_plot(ax: Axes, points: dict[str, list[tuple[int, float]]], references: Sequence[Reference] = (),
              ylabel: str = "test top-1 %", ticks: dict[int, str] | None = None) -> None:  # fmt: skip
    """Accuracy against bits: per method (``{method: [(bits, %), ...]}``) a line through the mean at each
    bit-width and a point per run; ``references`` as dashed horizontals; ``ticks``: the label of each bit-width
    (default ``W<b>A<b>``)."""
    for method, pts in points.items():
        xs = sorted({b for b, _ in pts})
        colour = method_colour(method)
        n = max(sum(1 for b, _ in pts if b == x) for x in xs)
        label = method + (f" (mean; points: {n} runs)" if n > 1 else "")
        ax.plot(xs, [statistics.mean(a for b, a in pts if b == x) for x in xs], color=colour, marker="o", label=label)
        if n > 1:
            ax.scatter(*zip(*pts), color=colour, s=12, alpha=0.6)
    _references(ax, references)
    bits = sorted({b for pts in points.values() for b, _ in pts})
    ax.set_xticks(bits, [(ticks or {}).get(b, f"W{b}A{b}") for b in bits])
    ax.set(xlabel="bits (weights and activations)", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


@dataclass
class Curve:
    """One run's accuracy per epoch. ``boundaries``: ``(x, name)`` where a phase begins (after the first);
    ``extra``: a second, thinner dashed line in the same colour (e.g. the teacher in co-study)."""

    label: str
    x: list[float]
    y: list[float]
    colour: str
    linestyle: str = "-"
    boundaries: list[tuple[float, str]] = field(default_factory=list)
    extra: tuple[list[float], list[float]] | None = None


def curves_plot(ax: Axes, curves: Sequence[Curve], references: Sequence[Reference] = (),
                ylabel: str = "validation top-1 %", extra_label: str = "teacher in co-study") -> None:  # fmt: skip
    """Accuracy per epoch, one line per :class:`Curve`, phase boundaries as dotted verticals in the curve's colour
    with the phase that begins there written along them; ``extra`` lines dash-dotted; ``references`` dashed."""
    handles = []
    for c in curves:
        marker = "o" if len(c.x) < 30 else None
        (line,) = ax.plot(c.x, c.y, color=c.colour, linestyle=c.linestyle, marker=marker, markersize=3, label=c.label)
        handles.append(line)
        if c.extra is not None and c.extra[0]:
            ax.plot(*c.extra, color=c.colour, linestyle="-.", linewidth=0.9, alpha=0.8)
        for x, name in c.boundaries:
            ax.axvline(x, color=c.colour, linestyle=":", linewidth=1, alpha=0.7)
            if name:
                ax.annotate(name, (x, 1), xycoords=("data", "axes fraction"), xytext=(2, -3),
                            textcoords="offset points", rotation=90, va="top", fontsize=7, color=c.colour)  # fmt: skip
    handles += _references(ax, references)
    if any(c.extra is not None and c.extra[0] for c in curves):
        handles.append(Line2D([], [], color="black", linestyle="-.", linewidth=0.9, label=extra_label))
    if any(c.boundaries for c in curves):
        handles.append(Line2D([], [], color="black", linestyle=":", linewidth=1, label="phase boundary"))
    ax.set(xlabel="epoch", ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8)


@dataclass
class Interval:
    """A mean with a confidence interval (``lo``, ``hi``; NaN: none) and the values it comes from."""

    label: str
    mean: float
    lo: float
    hi: float
    values: list[float]
    colour: str = "C0"


def intervals_plot(ax: Axes, rows: Sequence[Interval], xlabel: str) -> None:
    """One row per :class:`Interval`: the mean with its interval, each value as a grey point, a line at 0."""
    for i, r in enumerate(rows):
        xerr = None if math.isnan(r.lo) else [[r.mean - r.lo], [r.hi - r.mean]]
        ax.errorbar(r.mean, i, xerr=xerr, fmt="o", color=r.colour, capsize=3)
        ax.scatter(r.values, [i] * len(r.values), color="gray", s=8, zorder=3)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [r.label for r in rows])
    ax.invert_yaxis()
    ax.set(xlabel=xlabel)


def series_plot(ax: Axes, series: dict[str, dict[float, list[float]]], colours: dict[str, str] | None = None,
                log_x: bool = False) -> None:  # fmt: skip
    """Lines through the mean of each x, with the standard deviation as error bars where an x has several
    values: ``{label: {x: [values]}}``."""
    for label, by_x in series.items():
        xs = sorted(by_x)
        err = [statistics.stdev(by_x[x]) if len(by_x[x]) > 1 else 0 for x in xs]
        ax.errorbar(xs, [statistics.mean(by_x[x]) for x in xs], yerr=err, marker="o", capsize=3, label=label,
                    color=(colours or {}).get(label))  # fmt: skip
    if log_x:
        ax.set_xscale("log")
        ticks = sorted({x for by_x in series.values() for x in by_x})
        ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
        ax.minorticks_off()


# ----- the report's figures ---------------------------------------------------------------------
def _groups(runs: Sequence[Run]) -> dict[tuple[str, str], list[Run]]:
    """Runs by (data, student): accuracies on other tasks or of other models are never drawn together."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.data, r.student), []).append(r)
    return groups


def run_curve(run: Run, colour: str, linestyle: str = "-") -> tuple[Curve, str]:
    """The run's student accuracy per epoch over :meth:`Run.curve_stages`, and which metric it is (``val``,
    or ``train`` where the run measured no validation split)."""
    stages = run.curve_stages()
    records = [r for r in run.history if r["stage"] in {s["key"] for s in stages}]
    metric = "val" if any(r.get("val_acc") is not None for r in records) else "train"
    offset, offsets, boundaries = 0, {}, []
    for s in stages:
        if offset:
            boundaries.append((offset + 0.5, s["key"]))
        offsets[s["key"]] = offset
        offset += s["epochs"]
    x, y, tx, ty = [], [], [], []
    for r in records:
        value = r.get(f"{metric}_acc")
        if value is not None:
            x.append(offsets[r["stage"]] + r["epoch"])
            y.append(100 * value)
        if r.get("teacher_val_acc") is not None:
            tx.append(offsets[r["stage"]] + r["epoch"])
            ty.append(100 * r["teacher_val_acc"])
    what = f"{run.method} {run.bits_label}" if run.quantized else "float"
    label = f"{run.name}: {what}" + ("" if run.finished else " (unfinished)")
    return Curve(label, x, y, colour, linestyle, boundaries, (tx, ty) if tx else None), metric


def accuracy_per_epoch(runs: Sequence[Run]) -> Figure:
    """The student's accuracy per epoch of each run (validation split), phase boundaries marked, the float
    student as reference; one panel per data set, student model and bit-width. Float-only runs are drawn only
    where no quantized run shares their data and model (they start from scratch: another scale)."""
    panels: dict[tuple[str, str, str], list[Run]] = {}
    for (data, student), group in _groups(runs).items():
        quantized = [r for r in group if r.quantized] or group
        for r in quantized:
            panels.setdefault((data, student, r.bits_label), []).append(r)
    fig, axes = figure(len(panels))
    for ax, ((data, student, bits), group) in zip(axes, panels.items()):
        by_method = len({r.method for r in group}) == len(group)  # then each run in its method's colour
        colour_of = {r.path: method_colour(r.method) if by_method else f"C{i % 10}" for i, r in enumerate(group)}
        made = [run_curve(r, colour_of[r.path]) for r in group]
        metrics = {m for _, m in made}
        refs = _float_lines(group, student, "val", colour_of)
        curves_plot(ax, [c for c, _ in made], refs,
                    ylabel=f"{' / '.join(sorted(metrics)).replace('val', 'validation')} top-1 %")  # fmt: skip
        ax.set_title(f"{data}, {student}, {bits}: accuracy per epoch", fontsize=10)
    return fig


def _float_lines(group: Sequence[Run], student: str, split: str, colour_of: dict | None = None) -> list[Reference]:
    """The float student as reference: one grey line, or where the runs started from different float weights one
    per run in its colour (a grey band over their range where runs have no colour of their own)."""
    values = {r.path: 100 * v for r in group if (v := r.float_reference(split)) is not None}
    if not values:
        return []
    low, high = min(values.values()), max(values.values())
    if low == high:
        return [Reference(f"float {student}", low)]
    if colour_of is None:
        return [Reference(f"float {student}: {low:.2f}-{high:.2f} (the runs' own)", low, high=high)]
    return [Reference(f"float {student} ({p.name})", v, colour_of[p]) for p, v in values.items()]


def accuracy_vs_bits(runs: Sequence[Run], split: str = "test") -> Figure | None:
    """Final accuracy against bits per method (the float student as reference); None where no run is both
    quantized and finished."""
    # a run at mixed bits (quant.budget) has no one width to stand at
    groups = {k: [r for r in g if r.quantized and r.bits[0] != "mixed" and r.final(split) is not None]
              for k, g in _groups(runs).items()}  # fmt: skip
    groups = {k: g for k, g in groups.items() if g}
    if not groups:
        return None
    fig, axes = figure(len(groups), size=(5.5, 4.0))
    for ax, ((data, student), group) in zip(axes, groups.items()):
        points: dict[str, list[tuple[int, float]]] = {}
        ticks: dict[int, set[str]] = {}
        for r in group:
            points.setdefault(r.method, []).append((r.bits[0], 100 * r.final(split)))
            ticks.setdefault(r.bits[0], set()).add(r.bits_label)
        bits_plot(ax, points, _float_lines(group, student, split), ylabel=f"{split} top-1 %",
                  ticks={b: "/".join(sorted(labels)) for b, labels in ticks.items()})  # fmt: skip
        ax.set_title(f"{data}, {student}: final {split} accuracy", fontsize=10)
    return fig
