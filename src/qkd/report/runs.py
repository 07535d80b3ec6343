"""Run folders read back for reports: settings, plan, per-epoch history, summary and exported files.

Reads only the run folder's JSON and YAML files (and the exports' metadata), never a checkpoint, so a report
of many runs is quick and needs no model code. A run still training (no ``summary.json`` yet) is read too
and marked unfinished, with where it stands.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkd.errors import QKDError
from qkd.train import rundir


@dataclass
class ExportFile:
    """A file written by ``qkd export`` in the run's ``export/`` folder."""

    path: Path
    format: str  # int, onnx or onnx-int
    bytes: int
    float32_bytes: int | None  # the same network as a float32 checkpoint, where the export recorded it


@dataclass
class Run:
    """One run folder as a report sees it."""

    path: Path
    config: dict[str, Any]
    stages: list[dict[str, Any]]
    history: list[dict[str, Any]]
    summary: dict[str, Any] | None  # None while the run is unfinished
    exports: list[ExportFile] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def method(self) -> str:
        """The method of a quantized run; ``float`` for a run that trains float models only (``qkd train-fp``)."""
        if not self.quantized:
            return "float"
        if self.summary is not None:
            return self.summary["method"]
        return str(self.config.get("method") or "?")

    @property
    def quantized(self) -> bool:
        return any(s["quantized"] for s in self.stages)

    @property
    def bits(self) -> tuple[int | None, int | None]:
        """Weight and activation bits of the quantized layers; (None, None) for a float-only run."""
        if not self.quantized:
            return None, None
        if self.summary is not None:
            return self.summary["bits"].get("weight"), self.summary["bits"].get("act")
        q = self.config.get("quant") or {}
        return q.get("weight_bits"), q.get("act_bits")

    @property
    def bits_label(self) -> str:
        w, a = self.bits
        if w == "mixed":  # chosen per layer within quant.budget
            return "mixed"
        return "float" if not self.quantized else f"W{w or 'f'}A{a or 'f'}"

    @property
    def data(self) -> str:
        return str((self.config.get("data") or {}).get("name") or "own data")

    @property
    def role(self) -> str:
        """The model the run trains to its end: the student, or the teacher of a ``qkd train-fp --role teacher``."""
        return "student" if any(s.get("role", "student") == "student" for s in self.stages) else "teacher"

    @property
    def student(self) -> str:
        """The trained model's name (the teacher's for a run that trains only the teacher)."""
        if self.summary is not None and self.summary.get(self.role):
            return str(self.summary[self.role])
        return str((self.config.get(self.role) or {}).get("name") or (self.config.get("models") or {}).get(self.role))

    @property
    def wall_s(self) -> float:
        """Its epochs' time, and a post-training run's quantization (which has no epochs)."""
        ptq = (self.summary or {}).get("ptq", {}).get("time_s", 0.0)
        return sum(r.get("time_s", 0.0) for r in self.history) + ptq

    @property
    def position(self) -> str:
        """Where the run stands: ``finished``, or the last epoch it completed."""
        if self.finished:
            return "finished"
        if not self.history:
            return "not started"
        last = self.history[-1]
        return f"unfinished: {last['stage']} epoch {last['epoch']} of {last['epochs']}"

    def stage_results(self) -> dict[str, dict[str, Any]]:
        """Per stage: val/test accuracy at its end (finished stages of a finished run; for an unfinished run, the
        last validation figure of each stage so far)."""
        if self.summary is not None:
            return self.summary.get("stages", {})
        out: dict[str, dict[str, Any]] = {}
        for r in self.history:
            if r.get("val_acc") is not None:
                out[r["stage"]] = {"val": r["val_acc"], "epochs": r["epochs"]}
        return out

    def final(self, split: str = "test") -> float | None:
        """The trained student's accuracy on ``split`` at the end of its last stage (None: not measured yet)."""
        results = self.stage_results()
        keys = [s["key"] for s in self.stages if s.get("role", "student") == self.role and s["key"] in results]
        return results[keys[-1]].get(split) if keys else None

    def float_reference(self, split: str = "test") -> float | None:
        """The float student's accuracy (before quantization), where the run measured it and quantized it."""
        if self.summary is None or not self.quantized:
            return None
        return (self.summary.get("student_fp") or {}).get(split)

    def curve_stages(self) -> list[dict[str, Any]]:
        """The stages a per-epoch curve shows: the student's quantized stages, or the trained model's stages of a
        float run."""
        quantized = [s for s in self.stages if s["quantized"]]
        return quantized or [s for s in self.stages if s.get("role", "student") == self.role]


def is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "stages.json").is_file()


def find_runs(targets: list[str | Path]) -> list[Path]:
    """Run folders from the command line: each target is a run folder, or a folder of run folders (``runs``)."""
    found: list[Path] = []
    for target in map(Path, targets):
        if is_run(target):
            found.append(target)
        elif target.is_dir() and (inside := sorted(p for p in target.iterdir() if p.is_dir() and is_run(p))):
            found.extend(inside)
        elif not target.exists():
            raise QKDError(f"{target} does not exist; give run folders (runs/<name>) or a folder of them (runs)")
        else:
            raise QKDError(f"{target} is not a run folder (no config.yaml and stages.json) and holds none; "
                           "give run folders written by qkd run or qkd.fit")  # fmt: skip
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise QKDError("no run folders given; e.g. qkd report runs/a runs/b, or qkd report runs")
    return unique


def load_run(path: str | Path) -> Run:
    """Read one run folder (``config.yaml``, ``stages.json``, ``metrics.jsonl``, ``summary.json``, ``export/``)."""
    path = Path(path)
    config = rundir.read_config(path)
    stages = _read_json(path / "stages.json")
    if not isinstance(stages, list):
        raise QKDError(f"{path / 'stages.json'} is not a list of stages; is this a run folder of this qkd?")
    history = []
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        for i, line in enumerate(metrics.read_text().splitlines()):
            try:
                history.append(json.loads(line))
            except ValueError:
                raise QKDError(f"{metrics} line {i + 1} is not JSON; the file is damaged") from None
    summary = _read_json(path / "summary.json") if (path / "summary.json").is_file() else None
    return Run(path, config, stages, history, summary, _exports(path / "export"))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise QKDError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise QKDError(f"{path} is not JSON ({e}); the file is damaged") from None


def _exports(folder: Path) -> list[ExportFile]:
    """The exported models in ``folder``, with the format and float32 size their metadata records."""
    from qkd.export.contract import read_onnx_contract

    found = []
    for p in sorted(folder.glob("*")) if folder.is_dir() else []:
        if p.suffix == ".safetensors" and (manifest := p.with_name(p.name + ".json")).is_file():
            contract = _read_json(manifest)
        elif p.suffix == ".onnx":
            contract = read_onnx_contract(p) or {}
        else:
            continue
        fmt = contract.get("export_format") or ("int" if p.suffix == ".safetensors" else "onnx")
        found.append(ExportFile(p, fmt, p.stat().st_size, contract.get("float32_bytes")))
    return found
