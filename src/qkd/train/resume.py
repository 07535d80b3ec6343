"""Resuming a run: what may differ from the run folder's settings, optimizer and model states read back, where the
run stands, and the one-line messages that say how to continue it."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from torch import nn

from qkd.config import where_settings
from qkd.distributed import is_main_process
from qkd.errors import Diverged, QKDError, Stopped
from qkd.train import rundir
from qkd.train.loop import EpochState
from qkd.train.stages import Stage
from qkd.train.state import RunState

log = logging.getLogger("qkd")


def stage_shape(stage: Stage) -> tuple:
    """What a resumed run must keep of a stage: its learning rates may change."""
    return stage.key, stage.phase, stage.epochs, stage.quantized, stage.role


def check_same_settings(run_dir: Path, record: dict, stages: list[Stage]) -> dict[str, tuple]:
    """The settings in ``record`` that differ from the run folder's: refused where they change the models, the
    data or the plan; returned (``{key: (old, new)}``) where they may change on resume."""
    changed = rundir.changed_settings(rundir.read_config(run_dir), record)
    refused = sorted(k for k in changed if not rundir.may_change_on_resume(k))
    saved = rundir.saved_stages(run_dir)
    if saved is not None and [stage_shape(s) for s in saved] != [stage_shape(s) for s in stages]:
        refused.append("stages (pretrain, phases or epochs)")
    if refused:
        raise QKDError(f"cannot resume {run_dir}: its settings differ in {', '.join(refused)}; "
                       "resume with the same settings, or start a new run folder")  # fmt: skip
    return changed


def record_changes(state: RunState, changes: dict[str, tuple], where: str, run_dir: Path) -> None:
    """Say which settings a resume changed (``{key: (old, new)}``), and keep them in ``state.changes``."""
    if is_main_process():
        log.info("resuming %s with changed settings (from %s): %s", run_dir, where, _listed(changes))
    state.changes.append({"from": where, "changed": {k: list(v) for k, v in changes.items()}})


def refuse_changes_when_finished(run_dir: Path, record: dict, changes: dict[str, tuple]) -> None:
    """A finished run trains no more: a resume that changes what it would train with (``optim.lr=...``) is refused,
    not reported as if it had trained so; settings that say where (a device, a data folder) may differ."""
    what = {k: v for k, v in changes.items() if not rundir.matches(k, where_settings())}
    if what:
        python = record.get("created_by") == rundir.PYTHON_API
        new_run = "another out=..." if python else "another --name or --out"
        raise QKDError(f"cannot resume {run_dir} with {_listed(what)}: the run is finished, so the change would have "
                       f"no effect; {resume_hint(run_dir, record)} alone reports its results; to train with it, start "
                       f"a new run ({new_run})")  # fmt: skip


def _listed(changes: dict[str, tuple]) -> str:
    return ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items())


def load_optim_state(optimizers: dict, schedulers: list, saved: dict) -> None:
    """Optimizer and schedule states of an interrupted stage, under this run's settings: the learning rates
    and hyperparameters built now (changed on resume, or not) replace the saved ones; the step count and
    momentum buffers are kept, and the schedule continues from where it was, scaled to the new rate."""
    fresh = [[{k: v for k, v in g.items() if k != "params"} for g in o.param_groups] for o in optimizers.values()]
    for name, o in optimizers.items():
        o.load_state_dict(saved["opt"][name])
    for sched, sd, groups, o in zip(schedulers, saved["sched"], fresh, optimizers.values()):
        sched.load_state_dict(sd)
        for g, new, base in zip(o.param_groups, groups, list(sched.base_lrs)):
            g.update({k: v for k, v in new.items() if k not in ("lr", "initial_lr")})
            g["lr"] *= new["initial_lr"] / base
            g["initial_lr"] = new["initial_lr"]
        sched.base_lrs = [g["initial_lr"] for g in o.param_groups]
        sched._last_lr = [g["lr"] for g in o.param_groups]


def load_state(model: nn.Module, state: dict, what: str) -> None:
    """``load_state_dict`` with a one-line error naming the first mismatch."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise QKDError(f"checkpoint does not fit {what}: {detail}") from None


def read_snapshot(ckpt: dict, student: nn.Module, teacher: nn.Module | None,
                  run_dir: Path | None) -> tuple[RunState, nn.Module | None, EpochState | None, dict]:  # fmt: skip
    """Load a ``last.pt`` snapshot into ``student`` and ``teacher`` (a student that was quantized then must be
    quantized already). Returns the run state; the teacher as it entered co-study (a copy of ``teacher``, when
    the run stopped in co-study; else None); where a stopped epoch stands; the optimizer/scheduler states."""
    for name, model in (("student", student), ("teacher", teacher)):
        if model is not None and ckpt.get(name) is not None:
            load_state(model, ckpt[name], f"the {name} of {run_dir}")
    before = None
    if ckpt.get("teacher_before") is not None:
        before = copy.deepcopy(teacher)
        load_state(before, ckpt["teacher_before"], f"the co-study teacher of {run_dir}")
    partial = EpochState(**ckpt["partial"]) if ckpt.get("partial") else None
    return RunState.from_snapshot(ckpt), before, partial, ckpt.get("optim") or {}


def position(stages: list[Stage], state: RunState, partial: EpochState | None) -> str:
    """Where the run stands, in words: ``3_tutor after epoch 2 of 5``, ``the start of 1_self_study``, ..."""
    i, epoch = state.stage, state.epoch
    if i >= len(stages):
        return "the end of the run"
    stage = stages[i]
    if partial is not None:
        return f"{stage.key} epoch {epoch + 1} of {stage.epochs}, after step {partial.step}"
    return f"{stage.key} after epoch {epoch} of {stage.epochs}" if epoch else f"the start of {stage.key}"


def resume_hint(run_dir: Path | None, record: dict, change: str = "") -> str:
    """The call or command that continues the run (with ``change``, a setting to change on the way)."""
    if record.get("created_by") == rundir.PYTHON_API:
        return f"fit(..., out={str(run_dir)!r}, resume=True{', ' + change if change else ''})"
    return f"qkd run --resume {run_dir}{' ' + change if change else ''}"


def stopped(by: str, exit_code: int, where: str, run_dir: Path | None, record: dict) -> Stopped:
    """The error of a run stopped by a signal (``by``) at ``where``."""
    if run_dir is None:
        return Stopped(f"stopped by {by} in {where} (nothing saved: no run folder)", exit_code)
    return Stopped(f"stopped by {by} in {where}; saved. Continue with: {resume_hint(run_dir, record)}", exit_code)


def diverged(what: str, stage: Stage, where: str, run_dir: Path | None, record: dict) -> Diverged:
    """The error of a run diverged in ``stage`` (``what`` happened; the last good checkpoint is at ``where``),
    with the resume that lowers the learning rate tenfold."""
    if run_dir is None:
        return Diverged(f"{what}; lower the learning rate")
    saved = (run_dir / "checkpoints" / "last.pt").is_file()
    kept = f"the last good checkpoint is kept ({where})" if saved else "nothing was saved yet"
    key = f"{stage.role}.lr" if not stage.quantized else "optim.lr"
    python = record.get("created_by") == rundir.PYTHON_API
    change = f"optim={{'lr': {stage.lr / 10:.3g}}}" if python else f"{key}={stage.lr / 10:.3g}"
    return Diverged(f"{what}; {kept}; continue with a lower learning rate: {resume_hint(run_dir, record, change)}")
