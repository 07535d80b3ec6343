"""How long a command takes to answer when it needs no model: ``qkd --help``, ``list``, ``config`` and the
refusal of a misspelt setting, this checkout against another (``--against``: a checkout of an older commit,
e.g. ``git worktree add /tmp/before <commit>``), alternated run by run so that the machine's noise falls on
both alike. Prints the median wall time of each command and the ratio.

    python benchmarks/startup.py --against /tmp/before --repeats 7
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import typer
from common import ROOT, command_line, machine

COMMANDS = (["--help"], ["list"], ["config"], ["run", "quant.wbits=3"], ["export", "runs/x", "--format", "nope"])


def _seconds(src: Path, argv: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qkd", *argv], env=env, capture_output=True, check=False)
    return time.perf_counter() - t0


def main(against: Path = typer.Option(..., help="Another checkout to compare with."), repeats: int = 7) -> None:
    print(f"# {command_line()}\n# {machine()}")
    print(f"{'command':40s} {'this s':>8s} {'other s':>8s} {'other/this':>10s}")
    for argv in COMMANDS:
        this, other = [], []
        for _ in range(repeats):
            this.append(_seconds(ROOT / "src", argv))
            other.append(_seconds(against / "src", argv))
        a, b = statistics.median(this), statistics.median(other)
        print(f"{'qkd ' + ' '.join(argv):40s} {a:8.2f} {b:8.2f} {b / a:10.1f}")


if __name__ == "__main__":
    typer.run(main)
