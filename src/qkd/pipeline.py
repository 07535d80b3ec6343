"""A run is a list of stages, each one phase with its own epochs, optimizers and cosine schedule.

Float training of the teacher and of the student (when asked) come first, then the method's
quantized phases. A checkpoint is written after every epoch and at every stage boundary; an
interrupted run resumes from the last one and, with the same seed on the CPU, ends bit-identical to
an uninterrupted run, because every epoch's randomness is derived from (seed, stage, epoch).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from qkd.checkpoint import load_checkpoint, save_checkpoint, write_json, write_text
from qkd.config import ModelConfig, RunConfig, build_config, dump_config
from qkd.data import DataBundle, build_data
from qkd.dist import broadcast_state, is_main_process, resolve_device
from qkd.engine import Runtime, evaluate, train_epoch
from qkd.errors import QKDError
from qkd.models import create_model, load_pretrained
from qkd.models.registry import accepts
from qkd.phases import PHASES, Distill
from qkd.quant import calibrate, quant_parameters, quantization_disabled, quantize_model, recalibrate_bn
from qkd.quant.ste import set_kernel_backend

log = logging.getLogger("qkd")

#: Methods are phase lists; the budget is split by the spec's 15/50/35 proportions, renormalised.
METHODS: dict[str, tuple[str, ...]] = {
    "qkd": ("self_study", "co_study", "tutor"),
    "qat": ("self_study",),
    "kd": ("tutor",),
    "ss+tu": ("self_study", "tutor"),
    "cs+tu": ("co_study", "tutor"),
}
_SPLIT_INDEX = {"self_study": 0, "co_study": 1, "tutor": 2}
EpochHook = Callable[[dict], None]


@dataclass
class Stage:
    """One phase of the run: ``role`` is the model trained as the 'student' of that phase."""

    key: str
    phase: str
    epochs: int
    lr: float
    teacher_lr: float
    quantized: bool
    role: str = "student"


def split_epochs(phases: tuple[str, ...], split: tuple[float, ...], total: int) -> list[int]:
    """Share ``total`` epochs between ``phases`` by their ``split`` weights (largest remainder)."""
    weights = [split[_SPLIT_INDEX[p]] for p in phases]
    exact = [total * w / sum(weights) for w in weights]
    epochs = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: epochs[i] - exact[i])
    for i in by_remainder[: total - sum(epochs)]:
        epochs[i] += 1
    return epochs


def float_stage(cfg: RunConfig, role: str) -> Stage:
    mcfg: ModelConfig = getattr(cfg, role)
    return Stage(f"fp_{role}", "self_study", mcfg.train_epochs, mcfg.lr, mcfg.lr, quantized=False, role=role)


def plan(cfg: RunConfig) -> list[Stage]:
    """The stages of a run: float training where asked, then the method's quantized phases."""
    if cfg.phases is not None:
        spec = [(p.name, p.epochs, p.lr, p.teacher_lr) for p in cfg.phases]
    else:
        names = METHODS[cfg.method]
        spec = [(n, e, None, None) for n, e in zip(names, split_epochs(names, cfg.split, cfg.epochs))]
    quant = [
        Stage(f"{i + 1}_{name}", name, epochs, lr or cfg.optim.lr, tlr or cfg.optim.teacher_lr, quantized=True)
        for i, (name, epochs, lr, tlr) in enumerate(spec)
    ]
    needs_teacher = any(PHASES[s.phase].uses_teacher for s in quant)
    floats = [float_stage(cfg, r) for r in (("teacher", "student") if needs_teacher else ("student",))]
    return [s for s in floats if s.epochs > 0] + quant


def build_model(mcfg: ModelConfig, data: DataBundle) -> nn.Module:
    """A zoo model sized for the data (classes, and channels where the model takes them)."""
    kwargs = dict(mcfg.kwargs)
    if accepts(mcfg.name, "in_channels"):
        kwargs.setdefault("in_channels", data.in_channels)
    model = create_model(mcfg.name, num_classes=data.num_classes, **kwargs)
    if mcfg.checkpoint:
        load_pretrained(model, mcfg.checkpoint)
    return model


def build_optimizer(model: nn.Module, lr: float, cfg: RunConfig) -> torch.optim.Optimizer:
    """SGD; weight decay on conv/linear weights only; quantizer parameters in their own group."""
    o = cfg.optim
    qparams = {id(p) for p in quant_parameters(model)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad and id(p) not in qparams:
            (decay if p.dim() > 1 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": quant_parameters(model), "weight_decay": 0.0, "lr": o.quant_lr or lr},
    ]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=lr, momentum=o.momentum, nesterov=o.nesterov)


def load_state(model: nn.Module, state: dict, what: str) -> None:
    """``load_state_dict`` with a one-line error naming the first mismatch."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise QKDError(f"checkpoint does not fit {what}: {detail}") from None


def epoch_seed(seed: int, stage: int, epoch: int) -> int:
    return (seed * 1_000_003 + stage * 10_007 + epoch) % (2**31)


class Run:
    """Builds data and models, runs the stages, writes everything under ``run_dir``."""

    def __init__(self, cfg: RunConfig, run_dir: Path, stages: list[Stage] | None = None) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.stages = stages if stages is not None else plan(cfg)
        self.device = resolve_device(cfg.device)
        rt = cfg.runtime
        self.rt = Runtime(self.device, rt.channels_last, rt.amp)
        set_kernel_backend(rt.kernels)
        self.data = self._build_data()
        torch.manual_seed(cfg.seed)
        self.student = self._place(build_model(cfg.student, self.data))
        uses_teacher = any(s.role == "teacher" or PHASES[s.phase].uses_teacher for s in self.stages)
        self.teacher = self._place(build_model(cfg.teacher, self.data)) if uses_teacher else None
        self.state = {"stage": 0, "epoch": 0, "history": [], "results": {}, "student_quantized": False}

    def _place(self, model: nn.Module) -> nn.Module:
        layout = torch.channels_last if self.rt.channels_last else torch.preserve_format
        return model.to(self.device, memory_format=layout)

    def _build_data(self) -> DataBundle:
        d = self.cfg.data
        return build_data(
            d.name,
            d.root,
            batch_size=d.batch_size,
            eval_batch_size=d.eval_batch_size,
            val_size=d.val_size,
            mean=d.mean,
            std=d.std,
            augment=d.augment,
            download=d.download,
            num_workers=d.num_workers,
            device=self.device,
            seed=self.cfg.seed,
            limit=d.limit,
            train_limit=d.train_limit,
        )

    # ----- checkpoints -------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def _snapshot(self, extra: dict | None = None) -> dict:
        return {
            **self.state,
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
            **(extra or {}),
        }

    def restore(self, ckpt: dict) -> dict:
        """Load a ``last.pt`` snapshot; returns the optimizer/scheduler states it holds."""
        if ckpt["student_quantized"]:
            self._quantize_student(calibrate_batch=False)
        for name, model in (("student", self.student), ("teacher", self.teacher)):
            if model is not None and ckpt.get(name) is not None:
                load_state(model, ckpt[name], f"the {name} of {self.run_dir}")
        self.state = {k: ckpt[k] for k in self.state}
        return ckpt.get("optim") or {}

    # ----- the run -----------------------------------------------------------------------------
    def _quantize_student(self, calibrate_batch: bool = True) -> None:
        self._place(quantize_model(self.student, self.cfg.quant))
        if calibrate_batch:
            train = self.data.train
            if hasattr(train, "set_epoch"):
                train.set_epoch(epoch_seed(self.cfg.seed, 999, 0))
            batches = (self.rt.batch(b)[0] for b in train)
            calibrate(self.student, next(batches))
            # BN statistics of the quantized network (under autocast, as training runs)
            with self.rt.autocast():
                recalibrate_bn(self.student, itertools.islice(batches, self.cfg.quant.bn_batches))
            broadcast_state(self.student)  # every rank starts from rank 0's quantizer steps and BN statistics
        self.state["student_quantized"] = True

    def evaluate_splits(self, model: nn.Module) -> dict[str, float]:
        return {
            "val": evaluate(model, self.data.val, self.rt),
            "test": evaluate(model, self.data.test, self.rt),
        }

    def _record_float_results(self) -> None:
        results = self.state["results"]
        if self.teacher is not None and "teacher_fp" not in results:
            results["teacher_fp"] = self.evaluate_splits(self.teacher)
        results["student_fp"] = self.evaluate_splits(self.student)

    def execute(self, on_epoch_end: EpochHook | None = None, resume_optim: dict | None = None) -> dict:
        """Run the remaining stages and write ``summary.json``; returns the summary."""
        while self.state["stage"] < len(self.stages):
            i = self.state["stage"]
            stage = self.stages[i]
            if stage.quantized and not self.state["student_quantized"]:
                self._record_float_results()
                self._quantize_student()
            self._run_stage(i, stage, on_epoch_end, resume_optim if self.state["epoch"] > 0 else None)
            resume_optim = None
        summary = self.summary()
        write_json(summary, self.run_dir / "summary.json")
        return summary

    def _phase_for(self, stage: Stage):
        trained = self.teacher if stage.role == "teacher" else self.student
        opts = {"student": build_optimizer(trained, stage.lr, self.cfg)}
        cls = PHASES[stage.phase]
        teacher = None if stage.role == "teacher" else self.teacher
        if cls.trains_teacher:
            opts["teacher"] = build_optimizer(self.teacher, stage.teacher_lr, self.cfg)
        d = self.cfg.distill
        return cls(trained, teacher, opts, Distill(d.temperature, d.alpha)), trained

    def _run_stage(self, i: int, stage: Stage, hook: EpochHook | None, resume_optim: dict | None) -> None:
        phase, trained = self._phase_for(stage)
        scheds = [self._scheduler(i, stage, o) for o in phase.optimizers.values()]
        if resume_optim:
            for name, o in phase.optimizers.items():
                o.load_state_dict(resume_optim["opt"][name])
            for s, sd in zip(scheds, resume_optim["sched"]):
                s.load_state_dict(sd)
        for epoch in range(self.state["epoch"], stage.epochs):
            self._run_epoch(i, stage, epoch, phase, trained, scheds)
            optim = {
                "opt": {n: o.state_dict() for n, o in phase.optimizers.items()},
                "sched": [s.state_dict() for s in scheds],
            }
            save_checkpoint(self._snapshot({"optim": optim}), self.ckpt_dir / "last.pt")
            if hook is not None:
                hook(self.state["history"][-1])
        self._finish_stage(i, stage, trained)

    def _scheduler(self, i: int, stage: Stage, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """Per-batch cosine decay over the stage, or (``optim.schedule=run``) the stage's stretch of one
        decay over all quantized stages, so that a new phase does not restart at the full rate."""
        batches = len(self.data.train)
        if self.cfg.optim.schedule == "phase" or not stage.quantized:
            return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(stage.epochs * batches, 1))
        quantized = [s for s in self.stages if s.quantized]
        offset = sum(s.epochs for s in self.stages[:i] if s.quantized) * batches
        total = max(sum(s.epochs for s in quantized) * batches, 1)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * (offset + t) / total)))

    def _run_epoch(self, i: int, stage: Stage, epoch: int, phase, trained: nn.Module, scheds: list) -> None:
        seed = epoch_seed(self.cfg.seed, i, epoch)
        torch.manual_seed(seed)
        if hasattr(self.data.train, "set_epoch"):
            self.data.train.set_epoch(seed)
        t0 = time.perf_counter()
        metrics = train_epoch(phase, self.data.train, scheds, self.rt, desc=f"{stage.key} {epoch + 1}")
        metrics["val_acc"] = evaluate(trained, self.data.val, self.rt)
        if stage.phase == "co_study":
            metrics["teacher_val_acc"] = evaluate(self.teacher, self.data.val, self.rt)
        record = {
            "stage": stage.key,
            "epoch": epoch + 1,
            "epochs": stage.epochs,
            **metrics,
            "lr": scheds[0].get_last_lr()[0],
            "time_s": time.perf_counter() - t0,
        }
        self.state["history"].append(record)
        self.state["epoch"] = epoch + 1
        self._write_metrics()
        if is_main_process():
            log.info(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    def _finish_stage(self, i: int, stage: Stage, trained: nn.Module) -> None:
        result = {
            "phase": stage.phase,
            "epochs": stage.epochs,
            "quantized": stage.quantized,
            "wall_s": sum(r["time_s"] for r in self.state["history"] if r["stage"] == stage.key),
        }
        result.update(self.evaluate_splits(trained))
        if stage.phase == "co_study":
            result["teacher"] = self.evaluate_splits(self.teacher)
        self.state["results"].setdefault("stages", {})[stage.key] = result
        boundary = {
            "state_dict": trained.state_dict(),
            "model": getattr(self.cfg, stage.role).name,
            "quantized": stage.quantized,
            "result": result,
        }
        save_checkpoint(boundary, self.ckpt_dir / f"{stage.key}.pt")
        self.state["stage"], self.state["epoch"] = i + 1, 0
        save_checkpoint(self._snapshot(), self.ckpt_dir / "last.pt")

    def _write_metrics(self) -> None:
        lines = "".join(json.dumps(r) + "\n" for r in self.state["history"])
        write_text(lines, self.run_dir / "metrics.jsonl")

    def summary(self) -> dict:
        q = self.cfg.quant
        return {
            "name": self.run_dir.name,
            "method": self.cfg.method if self.cfg.phases is None else "custom",
            "bits": {
                "weight": q.weight_bits,
                "act": q.act_bits,
                "first_last": q.first_last_bits,
                "quantizer": q.method,
                "per_channel": q.per_channel,
            },
            "teacher": self.cfg.teacher.name if self.teacher is not None else None,
            "student": self.cfg.student.name,
            "device": str(self.device),
            **self.state["results"],
            "wall_s": sum(r["time_s"] for r in self.state["history"]),
        }


def new_run_dir(cfg: RunConfig, out_dir: str | Path, overwrite: bool = False) -> Path:
    """The folder a new run will use; an existing one is refused unless ``overwrite``. Writes nothing."""
    name = cfg.name or f"{cfg.data.name}-{cfg.student.name}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(out_dir) / name
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise QKDError(
            f"run folder {run_dir} exists; resume it with --resume {run_dir}, pick another --name, or pass --overwrite"
        )
    return run_dir


def _init_run_dir(run_dir: Path, cfg: RunConfig, stages: list[Stage]) -> None:
    if run_dir.exists():  # an explicit overwrite: clear the old run's files
        for f in sorted(run_dir.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(dump_config(cfg), run_dir / "config.yaml")
    write_json([asdict(s) for s in stages], run_dir / "stages.json")  # what --resume continues


def load_run_config(run_dir: str | Path) -> RunConfig:
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise QKDError(f"{run_dir} is not a run folder (no config.yaml)")
    return build_config(yaml.safe_load(path.read_text()))


def run(
    cfg: RunConfig,
    out_dir: str | Path = "runs",
    *,
    overwrite: bool = False,
    on_epoch_end: EpochHook | None = None,
    stages: list[Stage] | None = None,
) -> tuple[Path, dict]:
    """Start a new run (``stages`` default to :func:`plan`); returns its folder and summary.

    Data, models and checkpoints are all loaded before the folder is written, so bad input leaves
    no half-made run behind.
    """
    run_dir = new_run_dir(cfg, out_dir, overwrite)
    r = Run(cfg, run_dir, stages)
    _init_run_dir(run_dir, cfg, r.stages)
    return run_dir, r.execute(on_epoch_end)


def saved_stages(run_dir: Path) -> list[Stage] | None:
    """The stages a run folder was started with (``stages.json``), or None for a folder without one."""
    path = run_dir / "stages.json"
    return [Stage(**s) for s in json.loads(path.read_text())] if path.is_file() else None


def resume(run_dir: str | Path, on_epoch_end: EpochHook | None = None) -> tuple[Path, dict]:
    """Continue an interrupted run from its last checkpoint (a finished run just re-reports)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    r = Run(cfg, run_dir, saved_stages(run_dir))
    last = r.ckpt_dir / "last.pt"
    optim = r.restore(load_checkpoint(last)) if last.is_file() else None
    return run_dir, r.execute(on_epoch_end, optim)


def _student_checkpoint(r: Run) -> Path:
    """A run folder's ``last.pt``, or, where that was deleted (it also holds the optimizer state and is
    several times larger), the checkpoint of the run's last student stage (never an earlier one)."""
    if (r.ckpt_dir / "last.pt").is_file():
        return r.ckpt_dir / "last.pt"
    final = [s.key for s in saved_stages(r.run_dir) or [] if s.role == "student"][-1:]
    if final and (r.ckpt_dir / f"{final[0]}.pt").is_file():
        return r.ckpt_dir / f"{final[0]}.pt"
    raise QKDError(f"{r.ckpt_dir} holds no student checkpoint (last.pt or a finished stage's): is the run finished?")


def load_student(cfg: RunConfig, target: str | Path, device: str | None = None) -> tuple[Run, bool]:
    """A Run holding the student of a run folder (its last checkpoint) or of a checkpoint file.

    Returns the Run (data and student built, nothing written) and whether the student is quantized.
    """
    target = Path(target)
    if device:
        cfg.device = device
    r = Run(cfg, target if target.is_dir() else target.parent, stages=[])
    ckpt = load_checkpoint(_student_checkpoint(r) if target.is_dir() else target)
    quantized = bool(ckpt.get("student_quantized", ckpt.get("quantized", False)))
    state = ckpt.get("student") or ckpt.get("state_dict")
    if state is None:
        raise QKDError(f"{target} holds no student weights")
    if quantized:
        r._place(quantize_model(r.student, cfg.quant))
    load_state(r.student, state, f"model '{cfg.student.name}'")
    return r, quantized


def evaluate_checkpoint(cfg: RunConfig, target: str | Path, device: str | None = None) -> dict:
    """Student accuracy of a run folder or a checkpoint file, quantized and in float."""
    r, quantized = load_student(cfg, target, device)
    result: dict = {"quantized": quantized, **r.evaluate_splits(r.student)}
    if quantized:
        with quantization_disabled(r.student):
            result.update({f"{k}_fp": v for k, v in r.evaluate_splits(r.student).items()})
    return result
