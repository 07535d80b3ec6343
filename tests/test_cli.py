"""The command line end to end, as a user runs it: exit codes, printed tables, one-line errors.

One test starts the installed ``qkd`` entry point in a real process; the others run the same ``main()`` in this
process (helpers.qkd_in_process), which gives the same exit codes and output without a torch import each."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import TINY, copy_run, qkd_in_process
from qkd.models import create_model

qkd = qkd_in_process


@pytest.mark.cli
def test_default_run_end_to_end(tmp_path):
    """`qkd run` with no arguments, through the installed entry point in a real process: the built-in digits demo,
    the table, the run folder."""
    script = shutil.which("qkd", path=str(Path(sys.executable).parent)) or shutil.which("qkd")
    assert script, "the qkd entry point is not installed beside this Python"
    res = subprocess.run([script, "run"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr
    for row in ("teacher FP (tiny_cnn_wide)", "student FP (tiny_cnn)", "after 1_self_study", "after 2_co_study",
                "after 3_tutor"):  # fmt: skip
        assert row in res.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "qkd" and summary["bits"]["weight"] == 2
    # the demo must teach something: a 2-bit student far above chance on the held-out test split
    assert summary["stages"]["3_tutor"]["test"] > 0.8


@pytest.fixture
def qat_run(demo_run, tmp_path):
    """A copy of the session's finished tiny QAT run, for the tests that read it and write beside it (eval, resume
    of a finished run, export)."""
    return copy_run(demo_run[1], tmp_path / "copy")


def test_eval_train_fp_and_resume_commands(tmp_path, qat_run):
    res = qkd("eval", str(qat_run))
    assert res.returncode == 0 and "test top-1 % quantizers off" in res.stdout
    res = qkd("run", "--resume", str(qat_run))  # a finished run: its table again, nothing changed
    assert res.returncode == 0 and "after 1_self_study" in res.stdout
    res = qkd("train-fp", *TINY, "--role", "student", "--name", "fp", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "fp" / "checkpoints" / "fp_student.pt").is_file()
    res = qkd("config", "digits", "quant.weight_bits=3")
    assert res.returncode == 0 and "weight_bits: 3" in res.stdout
    res = qkd("list")
    assert "resnet20" in res.stdout and "cifar10" in res.stdout


def _bad_npz(tmp_path):
    np.savez(tmp_path / "d-train.npz", x=np.zeros((4, 8, 8, 1), np.float32), y=np.zeros(4, np.int64))
    np.savez(tmp_path / "d-test.npz", x=np.zeros((4, 8, 8, 1), np.float32), y=np.zeros(4, np.int64))
    return tmp_path / "d-train.npz"


def _small_checkpoint(tmp_path):
    path = tmp_path / "small.pt"
    torch.save(create_model("tiny_cnn", width=4).state_dict(), path)
    return path


BAD = {
    "unknown model": (lambda p: ["student.name=resnet999"], "unknown model 'resnet999'; valid models: "),
    "unknown data set": (lambda p: ["data.name=mnist"], "unknown data set 'mnist'; valid data sets: "),
    "bits above 8": (lambda p: ["quant.weight_bits=9"], "bits must be an integer from 2 to 8"),
    "bits below 2": (lambda p: ["quant.act_bits=1"], "bits must be an integer from 2 to 8"),
    "missing data path": (lambda p: ["data.name=npz", f"data.root={p}/nowhere"], "nowhere"),
    "wrong data layout": (lambda p: ["data.name=npz", f"data.root={_bad_npz(p)}"], "uint8"),
    "missing cifar": (lambda p: ["data.name=cifar10", f"data.root={p}/c10"], "data.download=true"),
    "checkpoint shapes": (lambda p: [f"student.checkpoint={_small_checkpoint(p)}"], "does not fit the model"),
    "missing checkpoint": (lambda p: [f"student.checkpoint={p}/none.pt"], "checkpoint not found"),
    "malformed key": (lambda p: ["quant.wbits=2"], "quant.wbits: unknown key"),
    "malformed override": (lambda p: ["digits", "quant.weight_bits"], "must look like key=value"),
    "unknown preset": (lambda p: ["cifar11"], "config 'cifar11' not found"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_nonzero_nothing_written(tmp_path, case):
    make_args, needle = BAD[case]
    res = qkd("run", *make_args(tmp_path), "--out", str(tmp_path / "runs"))
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("qkd: error: "), res.stderr
    assert needle in lines[0]
    assert not (tmp_path / "runs").exists()


def test_bad_resume_and_existing_folder(tmp_path):
    res = qkd("run", "--resume", str(tmp_path / "nope"))
    assert res.returncode == 2 and "not a run folder" in res.stderr
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "keep.txt").write_text("precious")
    res = qkd("run", "--name", "r", "--out", str(tmp_path))
    assert res.returncode == 2 and "exists" in res.stderr
    assert (tmp_path / "r" / "keep.txt").read_text() == "precious"


def test_eval_of_a_checkpoint_file_alone_uses_its_own_settings(tmp_path):
    """A checkpoint carries its settings: at W3 it evaluates at W3 with no config, to the run's own figures."""
    res = qkd("run", *TINY, "method=qat", "quant.weight_bits=3", "--name", "r", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    ckpt = tmp_path / "r" / "checkpoints" / "1_self_study.pt"
    res = qkd("eval", str(ckpt), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "W3A2 fake-quant" in res.stdout and "after 1_self_study" in res.stdout
    test = next(ln.split() for ln in res.stdout.splitlines() if ln.strip().startswith("test top-1 %"))
    assert test == ["test", "top-1", "%", f"{100 * summary['stages']['1_self_study']['test']:.2f}"]
    res = qkd("eval", str(ckpt), "quant.weight_bits=4")
    assert res.returncode == 2 and "trained with quant.weight_bits=3, not 4" in res.stderr
    res = qkd("eval", str(ckpt), "student.kwargs={width: 4}")
    assert res.returncode == 2 and "trained with student.kwargs.width" in res.stderr
    res = qkd("eval", str(tmp_path / "r" / "checkpoints" / "fp_student.pt"), "device=cpu")
    assert res.returncode == 0 and "the student tiny_cnn, float, after fp_student" in res.stdout


def test_export_int_and_onnx_and_eval_backends(tmp_path, qat_run):
    for fmt, ext in (("int", "safetensors"), ("onnx", "onnx"), ("onnx-int", "onnx")):
        res = qkd("export", str(qat_run), "--format", fmt)
        assert res.returncode == 0, res.stderr
        assert (qat_run / "export" / f"student-{fmt}.{ext}").is_file()
        assert "smaller" in res.stdout and "top-1 agreement" in res.stdout
    for option, backend in (("--backend", "int"), ("--engine", "onnx-int")):  # --engine: the old name, kept
        res = qkd("eval", str(qat_run), option, backend)
        assert res.returncode == 0 and "agreement" in res.stdout
    res = qkd("eval", str(qat_run), "--backend", "tflite")  # one line, before the run is read
    assert res.returncode == 2 and res.stdout == "" and "unknown export format 'tflite'" in res.stderr
    res = qkd("export", str(qat_run), "--format", "tflite")
    assert res.returncode == 2 and "unknown export format 'tflite'" in res.stderr
    res = qkd("export", str(qat_run / "checkpoints" / "fp_student.pt"))
    assert res.returncode == 2 and "holds a float student" in res.stderr


def test_export_onnx_four_bit_storage(tmp_path, qat_run):
    """``--four-bit-storage`` reaches export_onnx: 3-bit codes in INT4 (the 8-bit edge layers stay 8-bit), a
    smaller file than the 8-bit one, checked like any export; refused in one line for another format."""
    eight, four = tmp_path / "eight.onnx", tmp_path / "four.onnx"
    assert qkd("export", str(qat_run), "--format", "onnx", "--out", str(eight)).returncode == 0
    res = qkd("export", str(qat_run), "--format", "onnx", "--four-bit-storage", "--out", str(four))
    assert res.returncode == 0, res.stderr
    assert "tensors in INT4/UINT4" in res.stdout and "top-1 agreement" in res.stdout
    assert four.stat().st_size < eight.stat().st_size
    res = qkd("export", str(qat_run), "--format", "int", "--four-bit-storage")
    assert res.returncode == 2 and "--four-bit-storage applies to --format onnx" in res.stderr


USER_CODE = """
import torch
from torch import nn
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset


def build(num_classes, width=8):
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


def loaders(batch_size, seed):
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8 - 1
    y = torch.tensor(d.target)
    train = DataLoader(TensorDataset(x[:1400], y[:1400]), batch_size=batch_size, shuffle=True)
    return {"train": train, "val": DataLoader(TensorDataset(x[1400:], y[1400:]), batch_size=256),
            "num_classes": 10}


def wrong():
    return 3
"""


def test_run_names_user_model_and_data_by_import_path(tmp_path):
    (tmp_path / "mynets.py").write_text(USER_CODE)
    args = ["method=qat", "epochs=1", "student.name=mynets:build", "student.kwargs={width: 4}",
            "student.train_epochs=1", "data.name=mynets:loaders", "data.batch_size=200"]  # fmt: skip
    res = qkd("run", *args, "--name", "u", "--out", str(tmp_path / "runs"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "runs" / "u" / "summary.json").read_text())
    assert summary["student"] == "mynets:build" and summary["layers"] == {"quantized": 2, "float": 0}
    assert "test" not in summary["student_fp"]  # the factory gave no test split
    res = qkd("export", str(tmp_path / "runs" / "u"), "--format", "int", cwd=tmp_path)
    assert res.returncode == 0 and "validation images" in res.stdout and "agreement 100.00 %" in res.stdout, res.stderr
    for bad, message in (("student.name=mynets:nothing", "has no attribute 'nothing'"),
                         ("student.name=nomodule:build", "cannot import nomodule"),
                         ("data.name=mynets:wrong", "must return a DataBundle"),
                         ("student.name=timm:resnet18", "timm")):  # fmt: skip
        res = qkd("run", *args, bad, "--name", "bad", "--out", str(tmp_path / "runs"), cwd=tmp_path)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert not (tmp_path / "runs" / "bad").exists()


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["list"], ["config"], ["run", "quant.wbits=3"], ["run", "epochs", "5"],
     ["export", "runs/x", "--format", "nope"], ["export", "runs/x", "--verify", "-5"],
     ["eval", "runs/x", "--backend", "nope"]],
    ids=["help", "list", "config", "misspelt-key", "no-equals", "export-format", "export-verify", "eval-backend"],
)  # fmt: skip
def test_answers_and_refusals_that_need_no_model_import_no_torch(argv):
    """torch's import is 3 s of every command's start (5.5 s before --help said anything); these need none."""
    code = (
        "import sys\nfrom qkd.cli import main\nsys.argv = ['qkd', *sys.argv[1:]]\ntry:\n    main()\n"
        "except SystemExit:\n    pass\nprint('torch imported' if 'torch' in sys.modules else 'no torch')"
    )
    res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip().splitlines()[-1] == "no torch", res.stdout[-500:] + res.stderr[-1500:]


def test_the_names_qkd_list_gives_are_the_registries():
    from qkd.config import DATA_NAMES, MODEL_NAMES
    from qkd.data import list_datasets
    from qkd.models import list_models

    assert tuple(list_models()) == MODEL_NAMES and tuple(list_datasets()) == DATA_NAMES
