"""Run folders: what a run writes where, and how a later command finds it again.

A run folder holds ``config.yaml`` (the resolved settings), ``stages.json`` (the plan that ``--resume``
continues), ``metrics.jsonl`` (one line per epoch), ``quantization.json`` (every layer's bits),
``checkpoints/`` (``last.pt`` after every epoch, ``<stage>.pt`` at every stage boundary) and
``summary.json`` when the run is finished.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from qkd.checkpoint import write_json, write_text
from qkd.errors import QKDError
from qkd.train.stages import Stage

#: ``config.yaml`` of a run started from Python with user objects: it cannot be rebuilt from names.
PYTHON_API = "qkd.fit"


def check_new(run_dir: Path, overwrite: bool) -> None:
    """Refuse an existing, non-empty run folder unless ``overwrite``. Writes nothing."""
    if run_dir.exists() and not run_dir.is_dir():
        raise QKDError(f"run folder {run_dir} is a file; pick another --name or --out")
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise QKDError(
            f"run folder {run_dir} exists; resume it with --resume {run_dir} (fit(..., resume=True) from Python), "
            "pick another name, or pass --overwrite"
        )


def init(run_dir: Path, config: dict[str, Any], stages: list[Stage]) -> None:
    """Create (or, after an explicit overwrite, empty) ``run_dir`` and write its config and plan."""
    if run_dir.exists():
        for f in sorted(run_dir.rglob("*"), reverse=True):
            f.unlink() if f.is_file() or f.is_symlink() else f.rmdir()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(yaml.safe_dump(config, sort_keys=False), run_dir / "config.yaml")
    write_json([asdict(s) for s in stages], run_dir / "stages.json")


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """The raw ``config.yaml`` of a run folder."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise QKDError(f"{run_dir} is not a run folder (no config.yaml)")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise QKDError(f"{path} is not a run config (a mapping of keys to values)")
    return data


def saved_stages(run_dir: Path) -> list[Stage] | None:
    """The stages a run folder was started with (``stages.json``), or None for a folder without one."""
    path = run_dir / "stages.json"
    return [Stage(**s) for s in json.loads(path.read_text())] if path.is_file() else None


def student_checkpoint(run_dir: Path) -> Path:
    """A run folder's ``last.pt``, or, where that was deleted (it also holds the optimizer state and is
    several times larger), the checkpoint of the run's last student stage (never an earlier one)."""
    ckpts = run_dir / "checkpoints"
    if (ckpts / "last.pt").is_file():
        return ckpts / "last.pt"
    final = [s.key for s in saved_stages(run_dir) or [] if s.role == "student"][-1:]
    if final and (ckpts / f"{final[0]}.pt").is_file():
        return ckpts / f"{final[0]}.pt"
    raise QKDError(f"{ckpts} holds no student checkpoint (last.pt or a finished stage's): is the run finished?")
