"""Reports of run folders: a comparison table, figures and one self-contained HTML page (``qkd report``).

>>> from qkd.report import load_runs, write_report
>>> report = write_report(load_runs(["runs/a", "runs/b"]), "report")
>>> print(report.text)          # the table; report.html, report.md and the PNGs are in report/
"""

from __future__ import annotations

from pathlib import Path

from qkd.report.page import Report, write_report
from qkd.report.runs import Run, find_runs, load_run


def load_runs(targets: list[str | Path]) -> list[Run]:
    """Run folders, or folders of run folders, read for a report (see :func:`find_runs`)."""
    return [load_run(p) for p in find_runs(targets)]


__all__ = ["Report", "Run", "find_runs", "load_run", "load_runs", "write_report"]
