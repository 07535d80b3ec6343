"""Trained models read back: a run folder's or checkpoint file's model with its settings and data, for
evaluation and export (``qkd eval``, ``qkd export``). Nothing is written."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from qkd.build import build_model, data_for
from qkd.checkpoint import load_checkpoint
from qkd.config import RunConfig, TrainConfig, build_config, load_config, where_settings, with_overrides
from qkd.data import DataBundle
from qkd.distributed import resolve_device
from qkd.errors import QKDError
from qkd.quant import quantization_disabled, quantize_model
from qkd.train import rundir
from qkd.train.loop import Runtime, top1_accuracy
from qkd.train.quantize import budget_config, recorded_budget
from qkd.train.resume import load_state
from qkd.train.stages import Stage

log = logging.getLogger("qkd")


@dataclass
class LoadedModel:
    """A run's trained model read back, with its data (nothing written).

    ``role`` is the model read (``student``, or ``teacher`` for a float teacher run); ``where`` says what
    state of the run it is (``the end of the run``, ``after <stage>``, or the stage and epoch it stopped in).

    >>> loaded = load_trained(None, "runs/mine")
    >>> loaded.evaluate_splits(loaded.model)     # {"val": 0.91, "test": 0.90}
    """

    model: nn.Module
    data: DataBundle
    quantized: bool
    runtime: Runtime
    cfg: RunConfig | None = None
    role: str = "student"
    where: str = "the end of the run"

    @property
    def student(self) -> nn.Module:
        """The model read (its old name, from when only students were read)."""
        return self.model

    def evaluate_splits(self, model: nn.Module) -> dict[str, float]:
        """Top-1 accuracy of ``model`` on the run's validation and test splits."""
        splits = {"val": self.data.val, "test": self.data.test}
        return {k: top1_accuracy(model, loader, self.runtime) for k, loader in splits.items() if loader is not None}


#: what eval and export may change in a checkpoint's own settings: where and how it runs, not what it is
EVAL_CHANGES = ("runtime.", *where_settings())
#: what a qkd.fit run did not record (the user's Python objects) and eval and export take by import path
FIT_GIVEN = ("student.", "teacher.", "data.")


def target_config(target: str | Path, overrides: list[str] | None = None, ckpt: dict | None = None,
                  role: str | None = None) -> RunConfig:  # fmt: skip
    """The settings of a run folder or checkpoint file: its own (a checkpoint carries them). ``key=value``
    overrides may change where and how it runs (device, data location, runtime); any other is refused. A
    :func:`qkd.fit` run recorded no model or data: ``overrides`` name them (``student.name=mynets:build
    data.name=mynets:loaders``, ``teacher.name`` for ``role="teacher"``)."""
    target = Path(target)
    if not target.exists():
        raise QKDError(f"{target} is neither a run folder nor a checkpoint file")
    folder = target if target.is_dir() else _run_folder_of(target)
    meta = None if target.is_dir() else (ckpt if ckpt is not None else load_checkpoint(target)).get("qkd")
    saved = meta["config"] if meta is not None else rundir.read_config(folder) if folder is not None else None
    if saved is not None and saved.get("created_by") == rundir.PYTHON_API:
        return _fit_run_config(saved, overrides or [], target, role or "student")
    if saved is not None:
        cfg = build_config(saved)
    elif overrides:
        log.warning("%s carries no settings (an older qkd wrote it): using the config given", target)
        return load_config(overrides[0] if "=" not in overrides[0] else None, [o for o in overrides if "=" in o])
    else:
        raise QKDError(f"{target} carries no settings (an older qkd wrote it, outside a run folder): give the "
                       f"config it was trained with, e.g. qkd eval {target} <preset> key=value")  # fmt: skip
    return _with_eval_changes(cfg, overrides or [], target)


def _fit_run_config(saved: dict, overrides: list[str], target: Path, role: str) -> RunConfig:
    """A qkd.fit run's own training settings, with the model and data that ``overrides`` name by import path
    (``student.name=mynets:build data.name=mynets:loaders``): qkd.fit had them as Python objects."""
    named = {o.partition("=")[0] for o in overrides}
    missing = [k for k in (f"{role}.name", "data.name") if k not in named]
    if missing:
        raise QKDError(f"{target} was written by qkd.fit with your own model and data, which it cannot record: give "
                       f"{' and '.join(missing)} by import path (a function that builds the {role} as you passed it "
                       f"to qkd.fit, one that returns your loaders), e.g. qkd eval {target} {role}.name=mynets:{role} "
                       "data.name=mynets:loaders (qkd export takes the same)")  # fmt: skip
    own = build_config({k: v for k, v in saved.items() if k in TrainConfig.model_fields})
    return _with_eval_changes(own, overrides, target, free=FIT_GIVEN)


def _with_eval_changes(cfg: RunConfig, overrides: list[str], target: Path, free: tuple[str, ...] = ()) -> RunConfig:
    if overrides and "=" not in overrides[0]:
        raise QKDError(f"{target} carries its own config; drop '{overrides[0]}' (only key=value changes of device, "
                       "data location or runtime are taken)")  # fmt: skip
    new = with_overrides(cfg, overrides)
    changed = rundir.changed_settings(cfg.model_dump(mode="json"), new.model_dump(mode="json"))
    refused = [k for k in changed if not rundir.matches(k, EVAL_CHANGES + free)]
    if refused:
        k = refused[0]
        raise QKDError(f"{target} was trained with {k}={changed[k][0]}, not {changed[k][1]}: drop that override "
                       "(a run carries its own settings; only device, data location, runtime may change)")  # fmt: skip
    return new


def _run_folder_of(path: Path) -> Path | None:
    folder = path.parent.parent
    return folder if path.parent.name == "checkpoints" and (folder / "config.yaml").is_file() else None


def load_trained(
    cfg: RunConfig | None,
    target: str | Path,
    device: str | None = None,
    *,
    role: str | None = None,
    unfinished: bool = False,
    ckpt: dict | None = None,
) -> LoadedModel:
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
    if quantized:  # with quant.budget: at the bits the run chose (in every checkpoint's metadata)
        quantize_model(model, budget_config(cfg.quant, recorded_budget(ckpt)))
    load_state(model, state, f"model '{getattr(cfg, role).name}'")
    rt = Runtime(resolve_device(cfg.device), cfg.runtime.channels_last, cfg.runtime.amp)
    return LoadedModel(rt.place(model), data, quantized, rt, cfg, role, where)


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
    return evaluate_loaded(load_trained(cfg, target, device, **kw))


def evaluate_loaded(loaded: LoadedModel) -> dict:
    """``{"quantized": ..., "val": ..., "test": ...}`` of a model read back, and for a quantized one the same
    splits with its quantizers off (``val_fp``, ``test_fp``: the same weights in float)."""
    result: dict = {"quantized": loaded.quantized, **loaded.evaluate_splits(loaded.model)}
    if loaded.quantized:
        with quantization_disabled(loaded.model):
            result.update({f"{k}_fp": v for k, v in loaded.evaluate_splits(loaded.model).items()})
    return result


def load_target(target: Path, overrides: list[str] | None, device: str | None, role: str | None,
                unfinished: bool) -> LoadedModel:  # fmt: skip
    """The CLI's reading of a run folder or checkpoint file: its own settings with ``overrides`` (``key=value``
    changes of where and how it runs), the file read once."""
    if role not in (None, "teacher", "student"):
        raise QKDError(f"--role must be teacher or student, not '{role}'")
    ckpt = load_checkpoint(target) if target.is_file() else None  # read once, for its settings and weights
    cfg = target_config(target, list(overrides or []) + [f"device={device}"] * bool(device), ckpt, role)
    return load_trained(cfg, target, role=role, unfinished=unfinished, ckpt=ckpt)


#: checkpoint files (torch.save): a zip archive, or a pickle in torch's legacy format
CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80")


def is_export_file(target: Path) -> bool:
    """A file written by qkd export (or meant as one): by its name, else by not being a torch checkpoint."""
    if not target.is_file() or target.suffix in (".pt", ".pth", ".ckpt"):
        return False
    if target.suffix in (".onnx", ".safetensors", ".pte"):
        return True
    with open(target, "rb") as f:
        return not f.read(4).startswith(CHECKPOINT_MAGIC)
