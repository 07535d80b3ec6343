"""What a new user hit exporting and evaluating (issue 25): a bad count of images to check, a qkd.fit run folder."""

import io
import sys

import pytest
import torch

from helpers import UserNet, copy_run, qkd_in_process, readme_block
from qkd.errors import QKDError
from qkd.export import compare, export_run, float_checkpoint_bytes
from qkd.quant import QuantConfig, quantize_model


def _files(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


@pytest.mark.parametrize("count", ["-5", "0"])
def test_export_refuses_a_count_to_verify_below_one(demo_run, tmp_path, count):
    """--verify -5 checked all but 5 images (355 of 360) and --verify 0 wrote the file, then failed dividing by 0:
    now one line before the run is read, nothing written."""
    run_dir = copy_run(demo_run[1], tmp_path)
    before = _files(run_dir)
    res = qkd_in_process("export", str(run_dir), "--verify", count)
    assert (res.returncode, res.stdout) == (2, "")
    assert res.stderr == (f"qkd: error: --verify is how many test images the export is checked on: 1 or more "
                          f"(e.g. 1000; a split holding fewer is checked whole), not {count}\n")  # fmt: skip
    assert _files(run_dir) == before


def test_export_run_refuses_a_count_to_verify_below_one(demo_run, tmp_path):
    with pytest.raises(QKDError, match=r"^verify is how many test images .* not -1$"):
        export_run(demo_run[1], "int", tmp_path / "m.safetensors", verify=-1)
    assert not (tmp_path / "m.safetensors").exists()


def test_float_checkpoint_bytes_leaves_a_layer_quantized_in_place_whole():
    """It dequantized a deep copy, which shares the class torch makes for a layer quantized in place (the
    same-padding conv): the original lost its ``weight`` and could no longer run or export."""
    model = quantize_model(UserNet(8), QuantConfig(weight_bits=4, act_bits=4))
    x = torch.zeros(2, 1, 8, 8)
    model(x)
    plain = io.BytesIO()
    torch.save(UserNet(8).state_dict(), plain)
    assert float_checkpoint_bytes(model) == plain.tell()  # what a float32 checkpoint of the same network takes
    model.eval()(x)


# qkd.fit's network and loaders, as a user's module names them for the command line
MYNETS = """from helpers import UserNet, digits_loaders


def student(width=8):
    return UserNet(width)


def loaders():
    return digits_loaders()
"""
NAMED = ["student.name=mynets:student", "data.name=mynets:loaders"]


@pytest.fixture
def fit_run(full_fit, tmp_path, monkeypatch):
    """(a copy of the qkd.fit run, its validation accuracy): mynets.py beside it, in the working directory."""
    (tmp_path / "mynets.py").write_text(MYNETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(tmp_path)
    yield copy_run(full_fit[0].run_dir, tmp_path), full_fit[0].summary["stages"]["3_tutor"]["val"]
    sys.modules.pop("mynets", None)


def test_fit_run_is_evaluated_and_exported_by_the_command(fit_run):
    """Both refused it ("load it from Python"): the model and data are named by import path, as qkd run takes them."""
    run_dir, val = fit_run
    res = qkd_in_process("eval", run_dir.name, *NAMED, cwd=run_dir.parent)
    assert res.returncode == 0, res.stderr
    assert f"  val top-1 %                   {100 * val:.2f}\n" in res.stdout
    res = qkd_in_process("export", run_dir.name, *NAMED, "--format", "onnx", cwd=run_dir.parent)
    assert res.returncode == 0, res.stderr
    assert "checked on 397 validation images against the trained model: top-1 agreement 100.00 %" in res.stdout
    assert f"accuracy {100 * val:.2f} %" in res.stdout
    assert (run_dir / "export" / "student-onnx.onnx").is_file()


@pytest.mark.parametrize(("given", "missing"), [([], "student.name and data.name"), (NAMED[:1], "data.name")])
def test_fit_run_without_its_model_or_data_is_one_line(fit_run, given, missing):
    run_dir, _ = fit_run
    before = _files(run_dir)
    res = qkd_in_process("export", str(run_dir), *given)
    assert (res.returncode, res.stdout) == (2, "")
    assert res.stderr == (
        f"qkd: error: {run_dir} was written by qkd.fit with your own model and data, which it cannot record: give "
        f"{missing} by import path (a function that builds the student as you passed it to qkd.fit, one that returns "
        f"your loaders), e.g. qkd eval {run_dir} student.name=mynets:student data.name=mynets:loaders (qkd export "
        "takes the same)\n"
    )
    assert _files(run_dir) == before


def test_readme_fit_run_example(fit_run, capsys):
    run_dir, val = fit_run
    example = readme_block("target_config(")
    assert "runs/byom" in example
    exec(compile(example.replace("runs/byom", str(run_dir)), "README.md", "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.splitlines() == [str(val), "1.0"]
    assert (run_dir / "export" / "student-onnx.onnx").is_file()


def test_the_check_spreads_its_images_over_the_whole_split():
    """A test split stored by class (the CIFAR arrays are): the check's ``limit`` images come from batches spread over
    all of it, not from the first classes only; an iterable of unknown length is read from the start."""
    batches = [(torch.full((4, 1), float(i)), torch.full((4,), i)) for i in range(10)]  # batch i: class i
    seen: list[int] = []

    def exported(x: torch.Tensor) -> torch.Tensor:
        seen.append(int(x[0, 0]))
        return torch.nn.functional.one_hot(x[:, 0].long(), 10).float()

    check = compare(exported, exported, batches, limit=8)
    assert seen[::2] == [0, 5] and check["images"] == 8 and check["export_acc"] == 1.0
    seen.clear()
    compare(exported, exported, iter(batches), limit=8)
    assert seen[::2] == [0, 1]
