"""What every benchmark shares: the record of the machine and command beside its figures, the results page,
and runs side by side in worker processes. Measurement only; what a run computes is the package's
(reusing a finished run: :func:`qkd.reuse.run_or_reuse`)."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import platform
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
#: the CIFAR-10 arrays and pretrained checkpoints (``../shared/data`` beside the checkout, or $QKD_SHARED_DATA)
DATA_DIR = Path(os.environ.get("QKD_SHARED_DATA", ROOT.parent / "shared" / "data"))


def command_line() -> str:
    """The command that is running, as a user would type it again (arguments quoted where needed)."""
    return f"python benchmarks/{Path(sys.argv[0]).name} {shlex.join(sys.argv[1:])}".strip()


def machine() -> str:
    """The CPU model (as lscpu names it) and whether it computes bf16 natively, cores, torch and its threads,
    Python, and the GPU where there is one."""
    cpu = platform.processor() or platform.machine()
    try:
        info = open("/proc/cpuinfo").read().splitlines()
        cpu = next(ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name"))
        flags = set(next(ln.split(":", 1)[1].split() for ln in info if ln.startswith("flags")))
        # one model name covers CPUs that compute differently: an AMD EPYC with or without AVX-512 BF16 gives
        # bf16 autocast (and so a run's result), or float32 -- runs of the two must not be paired
        cpu += " (native bf16)" if flags & {"avx512_bf16", "amx_bf16"} else " (no native bf16)"
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}{gpu}"
    )


def publish(text: str, append: bool = True) -> None:
    """Print a results section and, when ``append``, add it to docs/RESULTS.md."""
    print(text)
    if append:
        with open(ROOT / "docs" / "RESULTS.md", "a") as f:
            f.write(text)


def run_parallel(
    fn: Callable[..., Any], jobs: Sequence[tuple], parallel: int, done: Callable[[tuple, Any], None] | None = None
) -> None:
    """``fn(*job)`` for every job, ``parallel`` at a time, each in its own process with an equal share of the
    cores (``parallel`` 1: here, in order). ``done(job, result)`` runs here as each finishes. A failed job does
    not stop the others; the failures are raised together at the end, each named by its job's first item."""
    done = done or (lambda job, result: None)
    if parallel <= 1:
        for job in jobs:
            done(job, fn(*job))
        return
    threads, failed = max(1, (os.cpu_count() or 1) // parallel), []
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(parallel, mp_context=spawn, initializer=_die_with_parent) as pool:
        futures = {pool.submit(_in_worker, fn, job, threads): job for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            try:
                done(job, future.result())
                logging.info("finished %s", _label(job))
            except Exception as e:  # noqa: BLE001 - reported below, with the job's name
                failed.append(f"{_label(job)}: {type(e).__name__}: {e}")
    if failed:
        raise RuntimeError("runs failed:\n" + "\n".join(failed))


def _die_with_parent() -> None:
    """A worker gets SIGTERM when the process that started it dies (Linux): a stopped study must not leave its
    workers training on, unseen, in the run folders the next study run trains in (qkd's trainer stops at SIGTERM
    with a checkpoint, so the cell resumes)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _in_worker(fn: Callable[..., Any], job: tuple, threads: int) -> Any:
    torch.set_num_threads(threads)
    return fn(*job)


def _label(job: tuple) -> str:
    return str(getattr(job[0], "name", job[0]))
