import contextlib
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qkd.config import load_config

SHARED_DATA = Path(os.environ.get("QKD_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

# A run small enough for unit tests: digits, a few epochs per stage.
TINY = ["epochs=4", "teacher.train_epochs=1", "student.train_epochs=1", "teacher.kwargs={width: 8}",
        "data.batch_size=128"]  # fmt: skip


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is faster, and far faster when other processes compete for the 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class StopAfter:
    """An ``on_epoch_end`` hook that raises KeyboardInterrupt after ``n`` epochs, as Ctrl-C would."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, record: dict) -> None:
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt


@pytest.fixture
def tiny_config():
    def make(*overrides: str):
        return load_config(None, [*TINY, *overrides])

    return make


def pytest_collection_modifyitems(items):
    # Keep `-m "not slow"` meaningful: anything touching the shared CIFAR data is slow.
    for item in items:
        if "shared" in item.name:
            item.add_marker(pytest.mark.slow)


# A quantized digits run as the README's deployment examples name it (runs/demo), quick to train: its folder's
# parent is the working directory those examples run in.
DEMO = ["teacher.train_epochs=1", "teacher.kwargs={width: 8}", "data.batch_size=128", "method=qat",
        "student.train_epochs=4", "epochs=4", "optim.lr=0.05", "name=demo"]  # fmt: skip


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """(working directory, run folder, the run's test accuracy) of one W2A2 digits run, trained once."""
    from qkd import pipeline

    root = tmp_path_factory.mktemp("demo")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir, summary = pipeline.run(load_config(None, DEMO), root / "runs")
    finally:
        torch.set_num_threads(before)
    return root, run_dir, summary["stages"]["1_self_study"]["test"]


def qkd_in_process(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``qkd ARGS`` through the command's own ``main()`` in this process: its exit status, stdout and stderr as a
    real process gives them, without the 5 s a fresh interpreter spends importing torch. Only for input the
    command refuses before any work; the tests that train or export run real processes."""
    from qkd.cli import main

    out, err, root = io.StringIO(), io.StringIO(), logging.getLogger()
    handlers, level, argv, here = root.handlers[:], root.level, sys.argv, Path.cwd()
    sys.argv = ["qkd", *args]
    try:
        os.chdir(cwd or here)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
        os.chdir(here)
        root.handlers[:] = handlers  # the command configures logging for itself (basicConfig(force=True))
        root.setLevel(level)
    return subprocess.CompletedProcess(["qkd", *args], code, out.getvalue(), err.getvalue())
