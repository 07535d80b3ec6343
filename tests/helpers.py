"""What several test modules share: tiny run settings, the ``qkd`` command in this process or in a real one, and
a user-written network on digits for ``qkd.fit``. Test modules import from here, never from each other."""

import contextlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import qkd

README = Path(__file__).resolve().parents[1] / "README.md"
SHARED_DATA = Path(os.environ.get("QKD_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

# A run small enough for unit tests: digits, a few epochs per stage.
TINY = ["epochs=4", "teacher.train_epochs=1", "student.train_epochs=1", "teacher.kwargs={width: 8}",
        "data.batch_size=128"]  # fmt: skip

# A quantized digits run as the README's deployment examples name it (runs/demo), quick to train: its folder's
# parent is the working directory those examples run in. Tests that need "a finished quantized run" use it.
DEMO = ["teacher.train_epochs=1", "teacher.kwargs={width: 8}", "data.batch_size=128", "method=qat",
        "student.train_epochs=4", "epochs=4", "optim.lr=0.05", "name=demo"]  # fmt: skip


class StopAfter:
    """An ``on_epoch_end`` hook that raises KeyboardInterrupt after ``n`` epochs, as Ctrl-C would."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, record: dict) -> None:
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt


# ----- the command line -------------------------------------------------------------------------------------
def qkd_process(*args: str, prefix: tuple | list = (), cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``qkd ARGS`` in a real process (5 s of torch import): only where the process is the point (the entry point,
    signals, umask, another user's rights, torchrun)."""
    cmd = [*prefix, sys.executable, "-m", "qkd", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=600)


def qkd_processes(*commands: list[str], prefix: tuple | list = ()) -> list[subprocess.CompletedProcess]:
    """Several ``qkd`` commands in one real process (a fresh interpreter, with the user rights and umask that
    ``prefix`` gives it), each through ``main()`` as :func:`qkd_in_process` runs it: one torch import for all."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from helpers import qkd_in_process; "
            "print(json.dumps([vars(qkd_in_process(*c)) for c in json.loads(sys.argv[2])]))")  # fmt: skip
    cmd = [*prefix, sys.executable, "-c", code, str(Path(__file__).parent), json.dumps(commands)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return [subprocess.CompletedProcess(**r) for r in json.loads(res.stdout.splitlines()[-1])]


def qkd_in_process(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``qkd ARGS`` through the command's own ``main()`` in this process: its exit status, stdout and stderr as a
    real process gives them, without the seconds a fresh interpreter spends importing torch. Modules a command
    imports by path from ``cwd`` (``student.name=mynets:build``) are forgotten afterwards."""
    from qkd.cli import main

    out, err, root = io.StringIO(), io.StringIO(), logging.getLogger()
    handlers, level, argv, here, modules = root.handlers[:], root.level, sys.argv, Path.cwd(), set(sys.modules)
    threads, path = torch.get_num_threads(), sys.path[:]
    sys.argv = ["qkd", *args]
    sys.path.insert(0, str(cwd or here))  # as `python -m qkd` has it: modules named by path import from there
    try:
        os.chdir(cwd or here)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv, sys.path[:] = argv, path
        os.chdir(here)
        root.handlers[:] = handlers  # the command configures logging for itself (basicConfig(force=True))
        root.setLevel(level)
        torch.set_num_threads(threads)
        if cwd is not None:  # a user's modules, imported from cwd, must not answer for another test's cwd
            for name in set(sys.modules) - modules:
                if getattr(sys.modules[name], "__file__", "") and str(cwd) in (sys.modules[name].__file__ or ""):
                    del sys.modules[name]
    return subprocess.CompletedProcess(["qkd", *args], code, out.getvalue(), err.getvalue())


def readme_block(needle: str) -> str:
    """The one Python example of the README that contains ``needle``."""
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if needle in b]
    return block


def copy_run(run_dir: Path, to: Path) -> Path:
    """A private copy of a shared finished run, for a test that writes into it (exports, resumes)."""
    return Path(shutil.copytree(run_dir, to / run_dir.name))


# ----- a user's own network and loaders for qkd.fit -----------------------------------------------------------
class SamePadConv(nn.Conv2d):
    """A "same"-padding conv with its own forward (as Keras ports and timm's Conv2dSame have)."""

    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__(cin, cout, k, padding=0, bias=False)
        self.same = ((k - 1) // 2, k // 2) * 2

    def forward(self, x):
        return F.conv2d(F.pad(x, self.same), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SplitBlock(nn.Module):
    """Channel split (as in ShuffleNetV2): half the channels pass, half go through a conv branch."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(c // 2, c // 2, 3, padding=1, bias=False), nn.BatchNorm2d(c // 2),
                                    nn.ReLU())  # fmt: skip

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return torch.cat([a, self.branch(b)], dim=1)


class UserNet(nn.Module):
    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(SamePadConv(1, width, 3), nn.BatchNorm2d(width), nn.ReLU())
        self.block = SplitBlock(width)
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())  # fmt: skip
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.down(self.block(self.stem(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def digits_loaders() -> tuple[DataLoader, DataLoader]:
    """Digits as a user's plain DataLoaders: 1,400 training images (14 batches of 100) and 397 validation."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8 - 1
    y = torch.tensor(digits.target)
    train = TensorDataset(x[:1400], y[:1400])
    val = TensorDataset(x[1400:], y[1400:])
    return DataLoader(train, batch_size=100, shuffle=True), DataLoader(val, batch_size=200)


def user_models() -> tuple[UserNet, UserNet]:
    """(student, teacher), the same weights at every call."""
    torch.manual_seed(0)
    return UserNet(8), UserNet(16)


# The qkd.fit run whose interrupted and resumed twins must end bit-identical to it (the `full_fit` fixture).
FIT_SETTINGS = dict(method="qkd", epochs=4, pretrain={"teacher": (3, 0.3), "student": (3, 0.3)},
                    quant=qkd.QuantConfig(weight_bits=3, act_bits=3), optim={"lr": 0.1})  # fmt: skip


def same_weights(a: dict, b: dict) -> bool:
    """Two state dicts with the same keys and bit-identical tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_grid_per_model(models: list[str], grids: list[tuple], offset: int = 0) -> list:
    """``(model, *grid)`` parameters for an export matrix: by default each model with one grid, taken in turn
    (from ``offset``) so that every grid and every model is still covered; the rest of the matrix is ``slow``."""
    import pytest

    def param(i: int, m: str, j: int, g: tuple):
        default = j == (i + offset) % len(grids)
        return pytest.param(m, *g, marks=() if default else pytest.mark.slow, id="-".join(map(str, (m, *g))))

    return [param(i, m, j, g) for i, m in enumerate(models) for j, g in enumerate(grids)]
