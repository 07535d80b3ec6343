"""The runner: from a run config to a run, with data and models built by name and the one trainer.

This is the CLI's path (``qkd run``, ``--resume``, ``train-fp``); the Python API (:func:`qkd.fit`) builds the
same :class:`~qkd.train.Trainer` from user objects. Data, models and checkpoints are all built before a run
folder is written, so bad input leaves no half-made run behind. Trained models are read back by
:mod:`qkd.trained` (``load_trained``, also here under its old name ``load_student``).
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import replace
from pathlib import Path

import torch

from qkd.build import build_model, data_for, load_run_config
from qkd.config import ModelConfig, RunConfig, with_overrides
from qkd.distributed import on_main, setup
from qkd.errors import QKDError
from qkd.train import rundir
from qkd.train.precheck import check_first_batch
from qkd.train.stages import Stage, float_stage, plan
from qkd.train.trainer import EpochHook, Trainer
from qkd.trained import (
    EVAL_CHANGES,
    LoadedModel,
    evaluate_checkpoint,
    evaluate_loaded,
    load_target,
    load_trained,
    target_config,
)

__all__ = [
    "EVAL_CHANGES",
    "LoadedModel",
    "LoadedStudent",
    "build_model",
    "data_for",
    "evaluate_checkpoint",
    "evaluate_loaded",
    "load_run_config",
    "load_student",
    "load_target",
    "load_trained",
    "model_float_stage",
    "new_run_dir",
    "restarted_run",
    "resume",
    "run",
    "run_plan",
    "target_config",
    "trainer_for",
]

log = logging.getLogger("qkd")


def run_plan(cfg: RunConfig) -> list[Stage]:
    """The stages of a configured run: float training where the model configs ask for it, then the method."""
    return plan(cfg, {role: (m.train_epochs, m.lr) for role, m in (("teacher", cfg.teacher), ("student", cfg.student))})


def model_float_stage(cfg: RunConfig, role: str) -> Stage:
    """The float training of ``role`` as its model config sets it (``qkd train-fp``)."""
    mcfg: ModelConfig = getattr(cfg, role)
    return float_stage(role, mcfg.train_epochs, mcfg.lr)


def trainer_for(cfg: RunConfig, run_dir: Path | None, stages: list[Stage] | None = None,
                on_epoch_end: EpochHook | None = None) -> Trainer:  # fmt: skip
    """Data and models built from ``cfg``, in a trainer writing to ``run_dir`` (nothing written yet); one batch
    has been through the models (:func:`~qkd.train.precheck.check_first_batch`)."""
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
    trainer = Trainer(student, teacher, data.train, data.val, data.test, config=cfg.train_config(), stages=stages,
                      out=run_dir, on_epoch_end=on_epoch_end, describe=describe,
                      record=cfg.model_dump(mode="json"))  # fmt: skip
    check_first_batch(trainer)  # one batch through both models: a mistake is one line, before any training
    return trainer


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


def restarted_run(out: str | Path, name: str | None) -> Path | None:
    """Under ``torchrun --max-restarts``, the run folder a restarted ``qkd run`` continues (None: start anew)."""
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restarts == 0:
        return None
    if name is None:
        raise QKDError("torchrun restarted this run, but without --name its run folder cannot be found again; "
                       "pass --name with --max-restarts")  # fmt: skip
    run_dir = Path(out) / name
    if not (run_dir / "config.yaml").is_file():
        return None  # it failed before its folder was written: start again
    log.warning("torchrun restart %d: continuing %s from its last checkpoint", restarts, run_dir)
    return run_dir


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


# read back by qkd.trained; here too under their old names, for callers of qkd.pipeline
load_student = load_trained
LoadedStudent = LoadedModel
