"""The README's Python examples run as they stand."""

import re
from pathlib import Path

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
