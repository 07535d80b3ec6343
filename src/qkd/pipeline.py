"""From a run config to objects: data and models built by name, then the one trainer runs them.

This is the CLI's path (``qkd run``, ``--resume``, ``train-fp``, ``eval``, ``export``); the Python API
(:func:`qkd.fit`) builds the same :class:`~qkd.train.Trainer` from user objects. Data, models and
checkpoints are all built before a run folder is written, so bad input leaves no half-made run behind.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from qkd.checkpoint import load_checkpoint
from qkd.config import ModelConfig, RunConfig, build_config, load_config, where_settings, with_overrides
from qkd.data import DataBundle, build_data
from qkd.distributed import on_main, resolve_device, setup
from qkd.errors import QKDError
from qkd.models import create_model, load_pretrained
from qkd.plugins import is_import_path
from qkd.quant import quantization_disabled, quantize_model
from qkd.train import rundir
from qkd.train.loop import Runtime, top1_accuracy
from qkd.train.resume import load_state
from qkd.train.stages import Stage, float_stage, plan
from qkd.train.trainer import EpochHook, Trainer

log = logging.getLogger("qkd")


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
    setup(cfg.device)  # under torchrun: join the group before the data is built, so that it is sharded
    data = data_for(cfg)
    torch.manual_seed(cfg.seed)  # the same initial weights for models built from scratch
    student = build_model(cfg.student, data)
    teacher = build_model(cfg.teacher, data) if any(s.uses_teacher for s in stages) else None
    describe = {"student": cfg.student.name, "teacher": cfg.teacher.name if teacher is not None else None,
                "data": {"mean": _listed(data.mean), "std": _listed(data.std), "num_classes": data.num_classes,
                         "in_channels": data.in_channels, "image_size": data.image_size,
                         "batch_size": cfg.data.batch_size}}  # fmt: skip
    return Trainer(student, teacher, data.train, data.val, data.test, config=cfg.train_config(), stages=stages,
                   out=run_dir, on_epoch_end=on_epoch_end, describe=describe,
                   record=cfg.model_dump(mode="json"))  # fmt: skip


def _listed(values) -> list | None:
    return None if values is None else list(values)


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
    setup(cfg.device)
    run_dir = on_main(lambda: new_run_dir(cfg, out_dir, overwrite))  # one name for every rank
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
    """A run's trained model read back, with its data (nothing written).

    ``role`` is the model read (``student``, or ``teacher`` for a float teacher run); ``where`` says what
    state of the run it is (``the end of the run``, ``after <stage>``, or the stage and epoch it stopped in)."""

    student: nn.Module
    data: DataBundle
    quantized: bool
    runtime: Runtime
    cfg: RunConfig | None = None
    role: str = "student"
    where: str = "the end of the run"

    def evaluate_splits(self, model: nn.Module) -> dict[str, float]:
        splits = {"val": self.data.val, "test": self.data.test}
        return {k: top1_accuracy(model, loader, self.runtime) for k, loader in splits.items() if loader is not None}


#: what eval and export may change in a checkpoint's own settings: where and how it runs, not what it is
EVAL_CHANGES = ("runtime.", *where_settings())


def target_config(target: str | Path, overrides: list[str] | None = None, ckpt: dict | None = None) -> RunConfig:
    """The settings of a run folder or checkpoint file: its own (a checkpoint carries them). ``key=value``
    overrides may change where and how it runs (device, data location, runtime); any other is refused."""
    target = Path(target)
    if not target.exists():
        raise QKDError(f"{target} is neither a run folder nor a checkpoint file")
    folder = target if target.is_dir() else _run_folder_of(target)
    meta = None if target.is_dir() else (ckpt if ckpt is not None else load_checkpoint(target)).get("qkd")
    if meta is not None:
        if meta["config"].get("created_by") == rundir.PYTHON_API:
            raise QKDError(f"{target} was written by qkd.fit with your own model and data; load it in Python "
                           "(torch.load, then load_state_dict into your quantized model)")  # fmt: skip
        cfg = build_config(meta["config"])
    elif folder is not None:
        cfg = load_run_config(folder)
    elif overrides:
        log.warning("%s carries no settings (an older qkd wrote it): using the config given", target)
        return load_config(overrides[0] if "=" not in overrides[0] else None, [o for o in overrides if "=" in o])
    else:
        raise QKDError(f"{target} carries no settings (an older qkd wrote it, outside a run folder): give the "
                       f"config it was trained with, e.g. qkd eval {target} <preset> key=value")  # fmt: skip
    return _with_eval_changes(cfg, overrides or [], target)


def _with_eval_changes(cfg: RunConfig, overrides: list[str], target: Path) -> RunConfig:
    if overrides and "=" not in overrides[0]:
        raise QKDError(f"{target} carries its own config; drop '{overrides[0]}' (only key=value changes of device, "
                       "data location or runtime are taken)")  # fmt: skip
    new = with_overrides(cfg, overrides)
    changed = rundir.changed_settings(cfg.model_dump(mode="json"), new.model_dump(mode="json"))
    refused = [k for k in changed if not rundir.matches(k, EVAL_CHANGES)]
    if refused:
        k = refused[0]
        raise QKDError(f"{target} was trained with {k}={changed[k][0]}, not {changed[k][1]}: drop that override "
                       "(a run carries its own settings; only device, data location, runtime may change)")  # fmt: skip
    return new


def _run_folder_of(path: Path) -> Path | None:
    folder = path.parent.parent
    return folder if path.parent.name == "checkpoints" and (folder / "config.yaml").is_file() else None


def load_student(
    cfg: RunConfig | None,
    target: str | Path,
    device: str | None = None,
    *,
    role: str | None = None,
    unfinished: bool = False,
    ckpt: dict | None = None,
) -> LoadedStudent:
    """The trained model of a run folder (its last checkpoint) or of a checkpoint file, with its settings
    (``cfg`` None: the target's own). ``role``: ``student`` or ``teacher`` (default: the model the run
    trained last). A run that has not finished is refused unless ``unfinished``. ``ckpt``: the target
    file's content, when the caller has read it already."""
    target = Path(target)
    cfg = cfg if cfg is not None else target_config(target)
    if device:
        cfg.device = device
    folder = target if target.is_dir() else _run_folder_of(target)
    stages = rundir.saved_stages(folder) if folder is not None else None
    trained_last = "student" if not stages else stages[-1].role
    path = rundir.final_checkpoint(target, role or trained_last) if target.is_dir() else target
    ckpt = ckpt if ckpt is not None and not target.is_dir() else load_checkpoint(path)
    role = role or _stage_role(ckpt, path) or trained_last
    state, quantized, where, finished = _read_model(ckpt, role, path, stages)
    if not finished and not unfinished:
        hint = f"finish it with qkd run --resume {folder}, or " if folder is not None else ""
        raise QKDError(f"{path} is from an unfinished run (stopped at {where}): {hint}pass --unfinished to use "
                       "its model as it is now")  # fmt: skip
    data = data_for(cfg)
    model = build_model(getattr(cfg, role), data)
    if quantized:
        quantize_model(model, cfg.quant)
    load_state(model, state, f"model '{getattr(cfg, role).name}'")
    rt = Runtime(resolve_device(cfg.device), cfg.runtime.channels_last, cfg.runtime.amp)
    layout = torch.channels_last if rt.channels_last else torch.preserve_format
    return LoadedStudent(model.to(rt.device, memory_format=layout), data, quantized, rt, cfg, role, where)


def _read_model(ckpt: dict, role: str, path: Path, stages: list[Stage] | None) -> tuple[dict, bool, str, bool]:
    """The weights of ``role`` in a checkpoint, whether they are quantized, the run's state they are from,
    and whether that is a finished run or stage (a stage's own checkpoint is a finished result)."""
    if "state_dict" in ckpt:  # a stage boundary: one model, a finished stage
        saved_role = _stage_role(ckpt, path)
        if saved_role != role:
            raise QKDError(f"{path} holds the {saved_role}, not the {role}; drop --role or pick another file")
        return ckpt["state_dict"], bool(ckpt.get("quantized")), f"after {ckpt.get('stage', path.stem)}", True
    if ckpt.get(role) is None:
        raise QKDError(f"{path} holds no {role} weights")
    meta = ckpt.get("qkd")
    if meta is not None:
        finished, where = meta["finished"], meta["position"]
    else:  # an older checkpoint: its position against the run folder's plan, where there is one
        finished = stages is None or ckpt.get("stage", 0) >= len(stages)
        where = "the end of the run" if finished else f"{stages[ckpt['stage']].key} after epoch {ckpt.get('epoch', 0)}"
    return ckpt[role], role == "student" and bool(ckpt.get("student_quantized")), where, finished


def _stage_role(ckpt: dict, path: Path) -> str | None:
    """The model a stage's checkpoint holds (None for a ``last.pt`` snapshot, which holds both)."""
    if "state_dict" not in ckpt:
        return None
    return ckpt.get("role", "teacher" if path.stem == "fp_teacher" else "student")


def evaluate_checkpoint(cfg: RunConfig | None, target: str | Path, device: str | None = None, **kw) -> dict:
    """Accuracy of a run folder's or checkpoint file's model: quantized, and with quantization off."""
    loaded = load_student(cfg, target, device, **kw)
    result: dict = {"quantized": loaded.quantized, **loaded.evaluate_splits(loaded.student)}
    if loaded.quantized:
        with quantization_disabled(loaded.student):
            result.update({f"{k}_fp": v for k, v in loaded.evaluate_splits(loaded.student).items()})
    return result
