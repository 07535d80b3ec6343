"""The trainer: the stage loop over plain modules and any source of batches, with a checkpoint per epoch.

Works on any ``nn.Module`` student and teacher and any iterable of ``(x, y)`` batches (the CLI's config path
builds them by name, then runs this same trainer). An interrupted run resumes from its last checkpoint and,
with the same seed on the CPU, ends bit-identical to an uninterrupted run: every epoch's randomness comes
from (seed, stage name, epoch), and what a stage draws before its first epoch from (seed, stage name)
(:mod:`~qkd.train.batches`); the run state, resuming and the measurements each have their own module."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from qkd._version import __version__
from qkd.checkpoint import save_checkpoint, write_json
from qkd.config import TrainConfig
from qkd.distributed import is_main_process, on_main, resolve_device, setup, sync_batchnorm, wrap
from qkd.errors import Diverged, QKDError
from qkd.phases import PHASES, Phase
from qkd.quant.budget import describe as describe_budget
from qkd.quant.ste import use_kernel_backend
from qkd.train import live, rundir
from qkd.train.batches import CALIBRATION, INDEX_SEEDING, SEEDING, START, Batches, run_seed
from qkd.train.loop import DivergenceGuard, EpochState, Runtime, train_epoch
from qkd.train.measure import EvalFn, Measurements, split_figures, summary
from qkd.train.optim import build_optimizer, build_scheduler
from qkd.train.quantize import (
    adaround_student,
    budget_config,
    calibrate_student,
    check_float_student,
    choose_student_bits,
    quantize_student,
    recorded_budget,
)
from qkd.train.resume import (
    check_same_settings,
    diverged,
    load_optim_state,
    position,
    read_snapshot,
    record_changes,
    refuse_changes_when_finished,
    stopped,
)
from qkd.train.stages import Stage, method_name, plan
from qkd.train.state import RunState
from qkd.train.stop import StopRequest

log = logging.getLogger("qkd")

EpochHook = Callable[[dict], None]


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` hands back: the trained models, the summary, and where it was written."""

    student: nn.Module
    teacher: nn.Module | None
    summary: dict
    run_dir: Path | None


class Trainer:
    """Runs QKD (or a baseline) on any student and teacher; see :func:`qkd.fit` for the short form.

    >>> trainer = Trainer(student, teacher, train_loader, val_loader, config=TrainConfig(method="qkd", epochs=10),
    ...                   out="runs/mine")
    >>> result = trainer.fit()            # result.student is the trained low-bit model
    >>> Trainer(...same arguments...).fit(resume=True)   # after an interruption

    ``stages`` replaces the plan made from ``config`` (float stages first, as :func:`~qkd.train.stages.plan`);
    ``evaluate(model, loader) -> float`` replaces top-1 accuracy; ``on_epoch_end(record)`` is called after
    every epoch with that epoch's metrics; ``describe`` adds to the summary (e.g. model names) and ``record``,
    when given, is written as ``config.yaml`` in place of the training settings.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        train: Any = None,
        val: Any = None,
        test: Any = None,
        *,
        config: TrainConfig | None = None,
        stages: list[Stage] | None = None,
        out: str | Path | None = None,
        evaluate: EvalFn | None = None,
        on_epoch_end: EpochHook | None = None,
        steps_per_epoch: int | None = None,
        describe: dict | None = None,
        record: dict | None = None,
    ) -> None:
        self.cfg = config or TrainConfig()
        self.stages = stages if stages is not None else plan(self.cfg)
        self.run_dir = Path(out) if out is not None else None
        setup(self.cfg.device)  # under torchrun: join the process group (one data-parallel run)
        self.device = resolve_device(self.cfg.device)
        rt = self.cfg.runtime
        self.rt = Runtime(self.device, rt.channels_last, rt.amp)
        if rt.amp and self.rt.precision != "bfloat16" and is_main_process():  # said, and in the summary
            log.info("runtime.amp: this CPU has no native bf16 (AVX-512 BF16 or AMX), where bf16 is about 10x "
                     "slower than float32; training in float32")  # fmt: skip
        self.train = Batches(train, steps_per_epoch)
        self.evals = {k: Batches(v, what=k) for k, v in (("val", val), ("test", test)) if v is not None}
        self.measure = Measurements(self.evals, self.rt, evaluate)
        self.on_epoch_end = on_epoch_end
        if any(s.uses_teacher for s in self.stages) and teacher is None:
            used = ", ".join(s.key for s in self.stages if s.uses_teacher)
            raise QKDError(f"stages {used} need a teacher; pass teacher=... or use method='qat' (no teacher)")
        self.student = self._prepare(student)
        self.teacher = self._prepare(teacher) if teacher is not None else None
        self.describe = {"student": type(student).__name__, "teacher": type(teacher).__name__ if teacher else None}
        self.describe.update(describe or {})
        self.record = record or {"created_by": rundir.PYTHON_API, **self.cfg.model_dump(mode="json"),
                                 "models": {k: self.describe[k] for k in ("student", "teacher")}}  # fmt: skip
        self.state = RunState()
        self.layers: dict | None = None  # quantized/float layer counts, once the student is quantized
        self.quant_table: dict | None = None  # and every layer's bits (quantization.json)
        self.budget: dict | None = None  # with quant.budget: the bits chosen, against the budget
        self.partial: EpochState | None = None  # where a stopped epoch stands
        self.events: live.Events | None = None  # TensorBoard, on rank 0 while fit runs
        self.stop = StopRequest()
        self.seeding = SEEDING  # a resumed run's own (restore)

    def _prepare(self, model: nn.Module) -> nn.Module:
        """On the device, in the layout; with ``runtime.sync_bn``, BatchNorm over the global batch (torchrun)."""
        return self.rt.place(sync_batchnorm(model, self.device) if self.cfg.runtime.sync_bn else model)

    # ----- the run -----------------------------------------------------------------------------
    def fit(self, resume: bool = False, overwrite: bool = False) -> FitResult:
        """Run the remaining stages and return the trained models and the summary (``summary.json``).

        With ``resume``, continue from the run folder's last checkpoint (a finished run only reports; a
        folder with no run yet starts one); settings that do not change the models or the data
        (optimizer, distillation, runtime, device) may differ, and the change is recorded.

        Ctrl-C or SIGTERM saves at the next step and raises :class:`~qkd.errors.Stopped`; a diverged loss
        raises :class:`~qkd.errors.Diverged`, keeping the last good checkpoint. The fake-quant kernels are
        ``runtime.kernels`` while it runs."""
        check_float_student(self.student, self.cfg.quant if any(s.quantized for s in self.stages) else None, resume)
        writer = live.tensorboard_writer(self.cfg.runtime.tensorboard, self.run_dir)
        with use_kernel_backend(self.cfg.runtime.kernels), self.stop.installed(), live.log_above_bars():
            optim_state = self._open(resume, overwrite)
            self._start_live(writer, resumed=optim_state is not None)
            try:
                self._run_stages(optim_state)
            finally:
                if self.events is not None:
                    self.events.close()
                    self.events = None
        if not self.state.student_quantized:  # float training only: its models are the results
            for s in self.stages:
                self.state.results[f"{s.role}_fp"] = split_figures(self.state.results["stages"][s.key])
        result = self.summary()
        self._write_json(result, "summary.json")
        return FitResult(self.student, self.teacher, result, self.run_dir)

    def _run_stages(self, optim_state: dict | None) -> None:
        while self.state.stage < len(self.stages):
            i = self.state.stage
            stage = self.stages[i]
            resumed = self.state.epoch > 0 or self.partial is not None
            if not resumed:  # what the stage draws before its first epoch: from its name, whatever came before
                self._reseed(i, START)
            if stage.quantized and not self.state.student_quantized:
                if self.cfg.runtime.eval == "full":
                    self.measure.float_results(self.state.results, self.student, self.teacher)
                self._quantize_student()
                if self.events is not None:
                    self.events.quantized(i, self.student)
            self._run_stage(i, stage, optim_state if resumed else None)
            optim_state = None

    def _open(self, resume: bool, overwrite: bool) -> dict | None:
        """Start the run folder, or read its last checkpoint back; returns the optimizer state to resume."""
        if self.run_dir is None:
            if resume:
                raise QKDError("resume=True needs the run folder: pass out=...")
            return None
        # the run folder is rank 0's: it decides, reads and writes; the other ranks get what it read
        if on_main(lambda: not resume or not (self.run_dir / "config.yaml").is_file()):  # resume starts a new run
            models = [self.student, self.teacher]
            on_main(lambda: rundir.start(self.run_dir, overwrite, self.record, self.stages, models))
            return None
        changes = on_main(lambda: check_same_settings(self.run_dir, self.record, self.stages))
        ckpt = on_main(lambda: rundir.last_intact_checkpoint(self.run_dir))
        optim_state = self.restore(ckpt) if ckpt is not None else None
        if self.state.stage < len(self.stages):  # a finished run only reports: nothing to change or clear
            if changes:
                record_changes(self.state, changes, self._position(), self.run_dir)
                rundir.write_settings(self.run_dir, self.record, self.stages)
            if is_main_process():
                rundir.clear_exports(self.run_dir)
        else:
            refuse_changes_when_finished(self.run_dir, self.record, changes)
        return optim_state

    def _start_live(self, writer: type | None, resumed: bool) -> None:
        """On rank 0, when stages are left to run: the start-up banner, and the TensorBoard events where
        ``writer`` (a ``SummaryWriter`` class) is given."""
        if not is_main_process() or self.state.stage >= len(self.stages):
            return
        q = self.cfg.quant
        bits = f"W{q.weight_bits}A{q.act_bits}"
        if q.budget is not None:
            bits = f"mixed bits {q.budget.bits} within {q.budget.unit} {q.budget.format(q.budget.limit)}"
        bits = f" at {bits} ({q.method})" if any(s.quantized for s in self.stages) else ""
        head = live.headline(method_name(self.cfg) + bits, self.rt, self.run_dir, writer is not None)
        where = self._position() if resumed else None
        log.info("%s", live.banner(head, {"train": self.train, **self.evals}, self.stages, where))
        if writer is not None:
            self.events = live.Events(writer, self.run_dir / live.FOLDER, self.stages, len(self.train),
                                      state=self.state, inside_epoch=self.partial is not None,
                                      student=self.student)  # fmt: skip

    def restore(self, ckpt: dict) -> dict:
        """Load a ``last.pt`` snapshot; returns the optimizer/scheduler states it holds."""
        if ckpt["student_quantized"]:
            self.budget = recorded_budget(ckpt)  # the bits chosen at the start, not chosen again
            self._quantize_student(calibrate_batch=False)
        self.state, self.measure.teacher_before, self.partial, optim = read_snapshot(
            ckpt, self.student, self.teacher, self.run_dir)  # fmt: skip
        self.seeding = ckpt.get("seeding", INDEX_SEEDING)  # a run begun before stage-name seeds keeps its own
        return optim

    def _seed(self, i: int, draw: int | str) -> int | None:
        """The seed of ``draw`` (an epoch, ``START`` or ``CALIBRATION``) of stage ``i``, under the run's scheme."""
        return run_seed(self.seeding, self.cfg.seed, [s.key for s in self.stages], i, draw)

    def _reseed(self, i: int, draw: str) -> None:
        """The global torch RNG from stage ``i``'s seed of ``draw`` (where the run's scheme has one)."""
        seed = self._seed(i, draw)
        if seed is not None:
            torch.manual_seed(seed)

    def _quantize_student(self, calibrate_batch: bool = True) -> None:
        """Quantize the student; with ``quant.budget``, at the bits chosen now (on a resume: those read back); with
        ``method=ptq``, the post-training step after calibration."""
        quant, seed = self.cfg.quant, self._seed(self.state.stage, CALIBRATION)
        start, ptq = time.perf_counter(), calibrate_batch and self.stages[self.state.stage].phase == "ptq"
        if quant.budget is not None and calibrate_batch:  # a resumed run's are read back, never chosen again
            self.budget = on_main(lambda: choose_student_bits(self.student, quant, self.rt, self.train.epoch(seed)))
        quant = budget_config(quant, self.budget)
        float_student = copy.deepcopy(self.student) if ptq and quant.ptq == "adaround" else None  # AdaRound's reference
        layers = quantize_student(self.student, quant, self.rt)
        self.quant_table = {**layers.to_dict(), "budget": self.budget} if self.budget else layers.to_dict()
        self.layers = {"quantized": layers.n_quantized, "float": layers.n_float}
        self._write_json(self.quant_table, "quantization.json")
        if calibrate_batch:
            if is_main_process():
                log.info("student layers (also in quantization.json):\n%s", layers)
                if self.budget is not None:
                    log.info("%s", describe_budget(self.budget, self.cfg.quant.budget))
            calibrate_student(self.student, quant, self.rt, self.train.epoch(seed))
            if ptq:
                self._post_training(float_student, seed, start)
        self.state.student_quantized = True

    def _post_training(self, float_student: nn.Module | None, seed: int | None, start: float) -> None:
        """``method=ptq``, the student calibrated: AdaRound against ``float_student`` where given, on the
        calibration pass's images; the summary's ``ptq`` entry, its time (the stage's, as it trains nothing)."""
        done = {"mode": self.cfg.quant.ptq}
        if float_student is not None:
            if is_main_process():
                log.info("AdaRound: %d images, %d iterations per layer", self.cfg.quant.ptq_images,
                         self.cfg.quant.ptq_iters)  # fmt: skip
            done.update(adaround_student(self.student, float_student, self.cfg.quant, self.rt,
                                         self.train.epoch(seed), stop=self.stop.__bool__))  # fmt: skip
            if self.stop:  # between two layers: nothing of it is kept, a resume rounds again
                raise stopped(self.stop.name, self.stop.exit_code, self._position(), self.run_dir, self.record)
        self.state.results["ptq"] = {**done, "time_s": time.perf_counter() - start}

    def evaluate_splits(self, model: nn.Module) -> dict[str, float]:
        """The metric (top-1 accuracy unless ``evaluate`` was given) on each evaluation split."""
        return self.measure.splits(model)

    def _phase_for(self, stage: Stage) -> tuple[Phase, nn.Module]:
        trained = self.teacher if stage.role == "teacher" else self.student
        opts = {"student": build_optimizer(trained, stage.lr, self.cfg.optim)}
        cls = PHASES[stage.phase]
        if cls.trains_teacher:
            opts["teacher"] = build_optimizer(self.teacher, stage.teacher_lr, self.cfg.optim)
        teacher = None if stage.role == "teacher" else self.teacher
        if cls.trains_teacher:  # co-study: both directions see the same batch on every rank
            teacher = wrap(teacher)
        return cls(wrap(trained), teacher, opts, self.cfg.distill), trained

    def _run_stage(self, i: int, stage: Stage, resume_optim: dict | None) -> None:
        phase, trained = self._phase_for(stage)
        scheds = [build_scheduler(o, self.stages, i, len(self.train), self.cfg.optim.schedule)
                  for o in phase.optimizers.values()]  # fmt: skip
        if resume_optim is None:  # the stage starts here (not resumed inside it)
            self._measure_agreement(stage, "start")
            if self.events is not None:
                self.events.stage_start(i)
        else:
            load_optim_state(phase.optimizers, scheds, resume_optim)
        guard = DivergenceGuard(self.cfg.optim.max_loss_ratio, every=1 if self.device.type == "cpu" else 32)
        steps = len(self.train)
        done = self.state.epoch * steps + (self.partial.step if self.partial is not None else 0)
        with live.stage_bar(stage, steps, done) as bar:
            for epoch in range(self.state.epoch, stage.epochs):
                finished = self._run_epoch(i, stage, epoch, phase, trained, scheds, guard, bar)
                optim = {
                    "opt": {n: o.state_dict() for n, o in phase.optimizers.items()},
                    "sched": [s.state_dict() for s in scheds],
                }
                extra = {"optim": optim, "partial": None if finished else asdict(self.partial)}
                self._save(self._snapshot(extra), "last.pt")
                if finished and self.on_epoch_end is not None:
                    self.on_epoch_end(self.state.history[-1])
                if self.stop:
                    raise stopped(self.stop.name, self.stop.exit_code, self._position(), self.run_dir, self.record)
        self._finish_stage(i, stage, trained)

    def _run_epoch(self, i: int, stage: Stage, epoch: int, phase: Phase, trained: nn.Module, scheds: list,
                   guard: DivergenceGuard, bar: tqdm) -> bool:  # fmt: skip
        """One epoch (or the rest of a stopped one); False when it stopped early on request."""
        batches = self.train.epoch(self._seed(i, epoch))
        start, self.partial = self.partial, None
        bar.set_description_str(f"{stage.key} epoch {epoch + 1}/{stage.epochs}", refresh=False)
        try:
            metrics, progress = train_epoch(phase, batches, scheds, self.rt, start=start, stop=self.stop.__bool__,
                                            guard=guard, bar=bar)  # fmt: skip
        except Diverged as e:
            raise self._diverged(stage, epoch, scheds, e) from None
        if metrics is None:
            self.partial = progress
            return False
        self.state.num_classes = metrics.pop("num_classes")
        t_eval = time.perf_counter()
        if "val" in self.evals and (epoch + 1 == stage.epochs or self.cfg.runtime.eval == "full"):
            metrics.update(self._validate(stage, epoch + 1 == stage.epochs, trained))
        eval_s = time.perf_counter() - t_eval
        time_s = metrics.pop("time_s") + eval_s
        record = {"stage": stage.key, "epoch": epoch + 1, "epochs": stage.epochs, **metrics,
                  "lr": scheds[0].get_last_lr()[0], "time_s": time_s, "eval_s": eval_s}  # fmt: skip
        self.state.history.append(record)
        self.state.epoch = epoch + 1
        if self.run_dir is not None:
            rundir.write_metrics(self.run_dir, self.state.history)
        if is_main_process():
            log.info(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if self.events is not None:
            self.events.epoch(i, record, self.student)
        return True

    def _validate(self, stage: Stage, last_epoch: bool, trained: nn.Module) -> dict[str, float]:
        """An epoch's validation figures: ``val_acc``, and the teacher's in co-study."""
        measured = self._measure_agreement(stage, "end") if last_epoch else None
        metrics = {}
        if measured is not None:  # the last epoch of a distillation stage: one pass gives both
            metrics["val_acc"] = measured["student_acc"]
        else:
            metrics["val_acc"] = self.measure.metric(trained, self.evals["val"])
        if stage.phase == "co_study":
            teacher_val = measured["teacher_acc"] if measured else self.measure.metric(self.teacher, self.evals["val"])
            metrics["teacher_val_acc"] = teacher_val
        return metrics

    def _finish_stage(self, i: int, stage: Stage, trained: nn.Module) -> None:
        result = {
            "phase": stage.phase,
            "epochs": stage.epochs,
            "quantized": stage.quantized,
            "wall_s": sum(r["time_s"] for r in self.state.history if r["stage"] == stage.key),
        }
        if stage.phase == "ptq":  # it trains nothing: its time is the quantization's
            result["wall_s"] = self.state.results.get("ptq", {}).get("time_s", 0.0)
        last = self.state.finished_stage(stage.key, stage.epochs)  # its last epoch's validation figures
        splits = list(self.evals)
        if self.cfg.runtime.eval == "lean" and i + 1 < len(self.stages):  # lean: the test split at the end only
            splits = [k for k in splits if k != "test"] or splits
        result.update(self.measure.splits(trained, last.get("val_acc"), splits))
        if stage.phase == "co_study":
            result["teacher"] = self.measure.splits(self.teacher, last.get("teacher_val_acc"), splits)
        self.measure.flag_chance(stage, result, self.state.num_classes)
        self._measure_agreement(stage, "end")
        self.measure.teacher_before = None
        self.state.results.setdefault("stages", {})[stage.key] = result
        if self.events is not None:
            self.events.stage_end(i, result)
        self.state.stage, self.state.epoch = i + 1, 0
        boundary = {
            "state_dict": trained.state_dict(),
            "model": self.describe[stage.role],
            "role": stage.role,
            "stage": stage.key,
            "quantized": stage.quantized,
            "result": result,
            "qkd": self._meta(),
        }
        snapshot = self._snapshot({"partial": None})
        boundary[rundir.SNAPSHOT] = snapshot  # resumable from here should last.pt and previous.pt both be damaged
        self._save(boundary, f"{stage.key}.pt")
        self._save(snapshot, "last.pt")

    def _measure_agreement(self, stage: Stage, when: str) -> dict | None:
        previous = self.stages[self.state.stage - 1].key
        return self.measure.agreement(stage, when, self.state.results, previous, self.teacher, self.student)

    # ----- failures and stops -----------------------------------------------------------------
    def _position(self) -> str:
        return position(self.stages, self.state, self.partial)

    def _diverged(self, stage: Stage, epoch: int, scheds: list, e: Diverged) -> Diverged:
        lr = scheds[0].get_last_lr()[0] if scheds else stage.lr
        self.partial = None
        what = f"training diverged in {stage.key} epoch {epoch + 1}: {e}, at learning rate {lr:.3g}"
        return diverged(what, stage, self._position(), self.run_dir, self.record)

    # ----- persistence -------------------------------------------------------------------------
    def _meta(self) -> dict:
        """What makes a checkpoint self-describing: the settings, the plan, where the run stands, the data's
        normalisation and the quantized layers."""
        return {
            "version": __version__,
            "config": self.record,
            "stages": [asdict(s) for s in self.stages],
            "position": self._position(),
            "finished": self.state.stage >= len(self.stages),
            "data": self.describe.get("data"),
            "quantization": self.quant_table,
        }

    def _snapshot(self, extra: dict | None = None) -> dict:
        before = self.measure.teacher_before
        return {
            **self.state.as_dict(),
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
            "teacher_before": before.state_dict() if before is not None else None,
            **(extra or {}),
            "seeding": self.seeding,
            "qkd": self._meta(),
        }

    def _save(self, state: dict, name: str) -> None:
        if self.run_dir is not None:
            save_checkpoint(state, self.run_dir / "checkpoints" / name,
                            keep_previous=rundir.PREVIOUS if name == "last.pt" else None)  # fmt: skip

    def _write_json(self, obj: Any, name: str) -> None:
        if self.run_dir is not None:
            write_json(obj, self.run_dir / name)

    def summary(self) -> dict:
        """The run's summary as it stands (``summary.json`` at the end)."""
        return {**summary(self.cfg, self.state, self.describe, self.run_dir, self.rt, self.layers, self.budget),
                "seeding": self.seeding}  # fmt: skip
