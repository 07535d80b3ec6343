"""The README's Python examples run as they stand."""

import re
from pathlib import Path

import pytest

from qkd.export import evaluate_export, export_run

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_bring_your_own_model_example_runs(tmp_path, monkeypatch, capsys):
    (example,) = [b for b in _python_blocks() if "qkd.fit(" in b]
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out.splitlines()
    assert "3 quantized, 0 float" in out
    accuracy, agreement = float(out[-2]), float(out[-1])
    assert accuracy > 0.8 and agreement == 1.0
    assert (tmp_path / "runs" / "byom" / "quantization.json").is_file()


def _block(needle: str) -> str:
    (block,) = [b for b in _python_blocks() if needle in b]
    return block


def _run(example: str, capsys) -> list[str]:
    exec(compile(example, "README.md", "exec"), {"__name__": "readme"})
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("baked", [False, True], ids=["normalised-input", "baked-preprocessing"])
def test_onnxruntime_example_gives_the_runs_accuracy(demo_run, monkeypatch, capsys, baked):
    """numpy and onnxruntime alone, with the file's metadata: the run's test accuracy, from either kind of file."""
    root, run_dir, accuracy = demo_run
    exported = export_run(run_dir, "onnx", bake_preprocessing=baked, verify=10)
    example = _block("ort.InferenceSession(")
    if baked:
        example = example.replace("student-onnx.onnx", exported.path.name)
        assert exported.path.name in example
    monkeypatch.chdir(root)
    out = _run(example, capsys)
    assert out[-2].startswith("predicted ") and out[-1].startswith("test top-1: ")
    top1 = float(out[-1].split()[-1])
    assert accuracy > 0.8 and abs(top1 - accuracy) <= 1 / 360 + 1e-9  # within one of the 360 test images
    assert top1 == evaluate_export(exported.path)["top1"]  # what `qkd eval FILE` says of the same file


def test_int_file_example_gives_the_runs_accuracy(demo_run, monkeypatch, capsys):
    root, _, accuracy = demo_run
    monkeypatch.chdir(root)
    out = _run(_block("load_int("), capsys)
    assert out[-2] == "runs/demo/export/student-int.safetensors 1.0"
    top1 = float(out[-1].split()[-1])
    assert accuracy > 0.8 and abs(top1 - accuracy) <= 1 / 360 + 1e-9
    assert top1 == evaluate_export(root / "runs/demo/export/student-int.safetensors")["top1"]


def test_every_install_line_installs_this_project_by_its_own_name():
    """PyPI's ``qkd`` is another project: ``pip install 'qkd[...]'`` installed it (issue 25, item 7)."""
    import tomllib

    project = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]
    assert project["name"] == "qkd-distill"
    extras = set(project["optional-dependencies"])
    lines = re.findall(r"pip install ([^\n#`]+)", README.read_text())
    assert lines
    for line in lines:
        target = line.split()[-1].strip("'\"")
        name, _, extra = target.partition("[")
        if name in (".", "-e"):
            name = "."
        assert name in (".", "qkd-distill", "tensorboard"), line  # this checkout, our name, or a plain extra
        assert set(extra.rstrip("]").split(",")) - {""} <= extras, line
