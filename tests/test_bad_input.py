"""Bad input from the command line: one line `qkd: error: ...`, exit status 2, and nothing written or lost.

Real processes, as a user runs them. Folders made read-only with chmod stop only a user without root's
power to write anywhere: as root those cases run under ``setpriv`` without that power, or are skipped.
"""

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import TINY, copy_run, qkd_in_process, qkd_processes

QUICK = [*TINY, "method=qat"]
STRANGER = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]  # root that chmod stops


def with_umask(umask: str) -> list[str]:
    return ["sh", "-c", f'umask {umask}; exec "$@"', "sh"]


def snapshot(root: Path) -> dict:
    """Every path under ``root`` with its bytes (None for a folder) and mode: what must not change."""
    return {p: (p.read_bytes() if p.is_file() else None, p.stat().st_mode) for p in sorted(root.rglob("*"))}


def read_only(folder: Path) -> list[str]:
    """Make ``folder`` read-only; return the prefix under which a qkd process cannot write there (or skip)."""
    folder.chmod(0o500)
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("root writes into read-only folders, and setpriv (to run without that power) is missing")
    probe = [*STRANGER, sys.executable, "-c", f"import os, sys; sys.exit(os.access({str(folder)!r}, os.W_OK))"]
    if subprocess.run(probe, capture_output=True).returncode != 0:
        pytest.skip("root writes into read-only folders, and setpriv cannot take that power away here")
    return STRANGER


def assert_one_line_error(res, needle: str) -> None:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("qkd: error: "), res.stderr
    assert needle in lines[0], lines[0]


@pytest.fixture
def run_022(demo_run, tmp_path_factory):
    """A finished tiny run written under umask 022 (a copy of the session's)."""
    return copy_run(demo_run[1], tmp_path_factory.mktemp("runs"))


@contextlib.contextmanager
def umask(mask: int):
    before = os.umask(mask)
    try:
        yield
    finally:
        os.umask(before)


# ----- qkd run: each case makes its input in tmp_path and gives the arguments after `run` ---------------------
def _new(p, *extra):
    return [*QUICK, *extra, "--out", str(p / "runs")]


def _a_file(p):
    (p / "taken").write_text("precious")
    return p / "taken"


def _cuda_absent(p):
    if torch.cuda.is_available():
        pytest.skip("CUDA is here")
    return _new(p, "--device", "cuda")


def _resume_with(p, run, name, text):
    """A run folder copied from ``run`` whose ``name`` holds ``text``."""
    shutil.copytree(run, p / "r", ignore=shutil.ignore_patterns("checkpoints"))
    (p / "r" / name).write_text(text)
    return ["--resume", str(p / "r")]


RUN = {
    "unknown device": (lambda p, r: _new(p, "--device", "gpu"), "'gpu' is not a device; use auto, cpu, cuda, cuda:N"),
    "cuda absent": (lambda p, r: _cuda_absent(p), "CUDA is not available; use --device cpu"),
    "out is a file": (lambda p, r: [*QUICK, "--out", str(_a_file(p))], "is a file, not a folder"),
    "name with /": (lambda p, r: _new(p, "--name", "a/b"), "single folder name"),
    "name ..": (lambda p, r: _new(p, "name=.."), "give the parent folder with --out"),  # as a config key
    "root for digits": (
        lambda p, r: _new(p, f"data.root={p}"),
        "digits is built in and reads no files; drop data.root",
    ),
    "cifar root a file": (lambda p, r: _new(p, "data.name=cifar10", f"data.root={_a_file(p)}"), "is a file"),
    "config.yaml not yaml": (lambda p, r: _resume_with(p, r, "config.yaml", "a: [1,"), "is not valid YAML"),
    "stages.json damaged": (lambda p, r: _resume_with(p, r, "stages.json", "[{"), "is not a list of stages"),
}


@pytest.mark.parametrize("case", list(RUN))
def test_run_bad_input_one_line_nothing_written(tmp_path, run_022, case):
    make, needle = RUN[case]
    args = make(tmp_path, run_022)
    before = snapshot(tmp_path)
    res = qkd_in_process("run", *args)
    assert_one_line_error(res, needle)
    assert snapshot(tmp_path) == before


@pytest.mark.cli  # as another user: one real process for both
def test_run_into_a_read_only_folder_or_below_one(tmp_path):
    (tmp_path / "ro").mkdir()
    prefix = read_only(tmp_path / "ro")
    before = snapshot(tmp_path)
    commands = [["run", *QUICK, "--out", str(out)] for out in (tmp_path / "ro", tmp_path / "ro" / "sub")]
    results = qkd_processes(*commands, prefix=prefix) if prefix else [qkd_in_process(*c) for c in commands]
    for res in results:
        assert_one_line_error(res, "is not writable; choose another --out")
    assert snapshot(tmp_path) == before


# ----- qkd export ---------------------------------------------------------------------------------------------
@pytest.mark.cli  # as another user: one real process for the three formats
def test_export_to_a_read_only_folder(tmp_path, run_022):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "student.bin").write_text("an earlier export")
    prefix = read_only(tmp_path / "ro")
    before = snapshot(tmp_path), snapshot(run_022)
    out = str(tmp_path / "ro" / "student.bin")
    commands = [["export", str(run_022), "--format", fmt, "--out", out] for fmt in ("int", "onnx", "onnx-int")]
    results = qkd_processes(*commands, prefix=prefix) if prefix else [qkd_in_process(*c) for c in commands]
    for res in results:
        assert_one_line_error(res, f"cannot write {out}: Permission denied; choose another")
    assert (snapshot(tmp_path), snapshot(run_022)) == before


def test_export_out_naming_a_folder_leaves_it_alone(tmp_path, run_022):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("precious")
    before = snapshot(tmp_path)
    res = qkd_in_process("export", str(run_022), "--format", "int", "--out", str(tmp_path / "taken"))
    assert_one_line_error(res, "Is a directory; choose another --out")
    assert snapshot(tmp_path) == before  # no temporary file left beside it either


# ----- file modes ---------------------------------------------------------------------------------------------
def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in folder.rglob("*") if p.is_file()}


@pytest.mark.cli  # under another umask: a real process
@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664)], ids=["022", "002"])
def test_run_and_export_files_get_the_umask_mode(tmp_path, run_022, mask, mode):
    """Under 022, the session's run and exports in this process; under 002, the run and its exports in one real
    process started with that umask, as a user's shell gives it."""
    onnx_format = "onnx-int" if mask == 0o002 else "onnx"  # one export per format and umask is enough
    run = run_022 if mask == 0o022 else tmp_path / "r"
    exports = [["export", str(run), "--format", fmt, "--out", str(tmp_path / "exports" / f"student-{fmt}.bin"),
                "--verify", "10"] for fmt in ("int", onnx_format)]  # fmt: skip
    if mask == 0o002:
        results = qkd_processes(["run", *QUICK, "--name", "r", "--out", str(tmp_path)], *exports,
                                prefix=with_umask("002"))  # fmt: skip
    else:
        with umask(mask):
            results = [qkd_in_process(*c) for c in exports]
    for res in results:
        assert res.returncode == 0, res.stderr
    written = _modes(run)
    for name in ("config.yaml", "summary.json", "quantization.json", "checkpoints/last.pt"):
        assert name in written
    exported = _modes(tmp_path / "exports")
    assert set(exported) == {"student-int.bin", "student-int.bin.json", f"student-{onnx_format}.bin"}
    assert {**written, **exported} == dict.fromkeys({**written, **exported}, mode)
