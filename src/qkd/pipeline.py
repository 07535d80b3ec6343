"""From a run config to objects: data and models built by name, then the one trainer runs them.

This is the CLI's path (``qkd run``, ``--resume``, ``train-fp``, ``eval``, ``export``); the Python API
(:func:`qkd.fit`) builds the same :class:`~qkd.train.Trainer` from user objects. Data, models and
checkpoints are all built before a run folder is written, so bad input leaves no half-made run behind.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from qkd.checkpoint import load_checkpoint
from qkd.config import ModelConfig, RunConfig, build_config, with_overrides
from qkd.data import DataBundle, build_data
from qkd.dist import resolve_device
from qkd.errors import QKDError
from qkd.models import create_model, load_pretrained
from qkd.plugins import is_import_path
from qkd.quant import quantization_disabled, quantize_model
from qkd.train import rundir
from qkd.train.loop import Runtime, evaluate
from qkd.train.stages import Stage, float_stage, plan
from qkd.train.trainer import EpochHook, Trainer, load_state


def run_plan(cfg: RunConfig) -> list[Stage]:
    """The stages of a configured run: float training where the model configs ask for it, then the method."""
    return plan(cfg, {role: (m.train_epochs, m.lr) for role, m in (("teacher", cfg.teacher), ("student", cfg.student))})


def model_float_stage(cfg: RunConfig, role: str) -> Stage:
    """The float training of ``role`` as its model config sets it (``qkd train-fp``)."""
    mcfg: ModelConfig = getattr(cfg, role)
    return float_stage(role, mcfg.train_epochs, mcfg.lr)


def build_model(mcfg: ModelConfig, data: DataBundle) -> nn.Module:
    """A model by name (zoo, ``timm:<name>`` or import path) sized for the data, from its checkpoint if given."""
    if data.num_classes is None and not is_import_path(mcfg.name):
        raise QKDError(f"model '{mcfg.name}' needs the number of classes, which the data factory does not give; "
                       "return num_classes from it, or name a model factory by import path")  # fmt: skip
    model = create_model(mcfg.name, data.num_classes, offered={"in_channels": data.in_channels}, **mcfg.kwargs)
    if mcfg.checkpoint:
        load_pretrained(model, mcfg.checkpoint)
    return model


def data_for(cfg: RunConfig, device: str | None = None) -> DataBundle:
    return build_data(cfg.data, device=resolve_device(device or cfg.device), seed=cfg.seed)


def trainer_for(cfg: RunConfig, run_dir: Path | None, stages: list[Stage] | None = None,
                on_epoch_end: EpochHook | None = None) -> Trainer:  # fmt: skip
    """Data and models built from ``cfg``, in a trainer writing to ``run_dir`` (nothing written yet)."""
    stages = stages if stages is not None else run_plan(cfg)
    data = data_for(cfg)
    torch.manual_seed(cfg.seed)  # the same initial weights for models built from scratch
    student = build_model(cfg.student, data)
    teacher = build_model(cfg.teacher, data) if any(s.uses_teacher for s in stages) else None
    describe = {"student": cfg.student.name, "teacher": cfg.teacher.name if teacher is not None else None}
    return Trainer(student, teacher, data.train, data.val, data.test, config=cfg.train_config(), stages=stages,
                   out=run_dir, on_epoch_end=on_epoch_end, describe=describe,
                   record=cfg.model_dump(mode="json"))  # fmt: skip


def new_run_dir(cfg: RunConfig, out_dir: str | Path, overwrite: bool = False) -> Path:
    """The folder a new run will use; an existing one is refused unless ``overwrite``. Writes nothing."""
    default = f"{cfg.data.name}-{cfg.student.name}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(out_dir) / (cfg.name or re.sub(r"[:/\\]", "-", default))  # import paths and timm: names
    rundir.check_new(run_dir, overwrite)
    return run_dir


def run(
    cfg: RunConfig,
    out_dir: str | Path = "runs",
    *,
    overwrite: bool = False,
    on_epoch_end: EpochHook | None = None,
    stages: list[Stage] | None = None,
) -> tuple[Path, dict]:
    """Start a new run (``stages`` default to :func:`run_plan`); returns its folder and summary."""
    run_dir = new_run_dir(cfg, out_dir, overwrite)
    trainer = trainer_for(cfg, run_dir, stages, on_epoch_end)
    return run_dir, trainer.fit(overwrite=overwrite).summary


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The config a run folder was started with (a CLI run; a :func:`qkd.fit` folder has user objects)."""
    data = rundir.read_config(run_dir)
    if data.get("created_by") == rundir.PYTHON_API:
        raise QKDError(f"{run_dir} was written by qkd.fit with your own model and data; resume or load it "
                       "from Python (fit(..., out=..., resume=True))")  # fmt: skip
    return build_config(data)


def resume(run_dir: str | Path, overrides: list[str] | None = None,
           on_epoch_end: EpochHook | None = None) -> tuple[Path, dict]:  # fmt: skip
    """Continue an interrupted run from its last checkpoint (a finished run just re-reports).

    ``overrides`` (``key=value``) change settings that leave the models and data as they are, e.g. a lower
    ``optim.lr`` after a divergence; the change is recorded in the run folder."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    stages = rundir.saved_stages(run_dir)
    if overrides:
        cfg = with_overrides(cfg, overrides)
        cfg.name = run_dir.name
        stages = _replan(cfg, stages)
    trainer = trainer_for(cfg, run_dir, stages, on_epoch_end)
    return run_dir, trainer.fit(resume=True).summary


def _replan(cfg: RunConfig, saved: list[Stage] | None) -> list[Stage] | None:
    """The saved plan with the learning rates of ``cfg`` (the trainer refuses any other difference)."""
    fresh = {s.key: s for s in run_plan(cfg) + [model_float_stage(cfg, r) for r in ("teacher", "student")]}
    if saved is None:
        return None
    return [replace(s, lr=fresh[s.key].lr, teacher_lr=fresh[s.key].teacher_lr) if s.key in fresh else s
            for s in saved]  # fmt: skip


@dataclass
class LoadedStudent:
    """A run's student read back, with its data (nothing written)."""

    student: nn.Module
    data: DataBundle
    quantized: bool
    runtime: Runtime

    def evaluate_splits(self, model: nn.Module) -> dict[str, float]:
        splits = {"val": self.data.val, "test": self.data.test}
        return {k: evaluate(model, loader, self.runtime) for k, loader in splits.items() if loader is not None}


def load_student(cfg: RunConfig, target: str | Path, device: str | None = None) -> LoadedStudent:
    """The student of a run folder (its last checkpoint) or of a checkpoint file."""
    target = Path(target)
    if device:
        cfg.device = device
    ckpt = load_checkpoint(rundir.student_checkpoint(target) if target.is_dir() else target)
    quantized = bool(ckpt.get("student_quantized", ckpt.get("quantized", False)))
    state = ckpt.get("student") or ckpt.get("state_dict")
    if state is None:
        raise QKDError(f"{target} holds no student weights")
    data = data_for(cfg)
    student = build_model(cfg.student, data)
    if quantized:
        quantize_model(student, cfg.quant)
    load_state(student, state, f"model '{cfg.student.name}'")
    rt = Runtime(resolve_device(cfg.device), cfg.runtime.channels_last, cfg.runtime.amp)
    layout = torch.channels_last if rt.channels_last else torch.preserve_format
    return LoadedStudent(student.to(rt.device, memory_format=layout), data, quantized, rt)


def evaluate_checkpoint(cfg: RunConfig, target: str | Path, device: str | None = None) -> dict:
    """Student accuracy of a run folder or a checkpoint file, quantized and in float."""
    loaded = load_student(cfg, target, device)
    result: dict = {"quantized": loaded.quantized, **loaded.evaluate_splits(loaded.student)}
    if loaded.quantized:
        with quantization_disabled(loaded.student):
            result.update({f"{k}_fp": v for k, v in loaded.evaluate_splits(loaded.student).items()})
    return result
