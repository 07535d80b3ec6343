"""The trainer: a list of stages over plain modules and any source of batches, with persistence.

Works on any ``nn.Module`` student and teacher and any iterable of ``(x, y)`` batches; the CLI's
config path builds its models and data by name and then runs this same trainer. With a run folder, a
checkpoint is written after every epoch and at every stage boundary; an interrupted run resumes from
the last one and, with the same seed on the CPU, ends bit-identical to an uninterrupted run, because
every epoch's randomness is derived from (seed, stage, epoch): the global torch seed is set before
each epoch (a ``DataLoader``'s shuffling and workers draw from it) and a source with ``set_epoch``
gets that seed too.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from qkd._version import __version__
from qkd.checkpoint import save_checkpoint, write_json, write_text
from qkd.config import TrainConfig
from qkd.distributed import (
    average_bn_statistics,
    broadcast_state,
    gather,
    is_main_process,
    on_main,
    resolve_device,
    setup,
    world_size,
    wrap,
)
from qkd.errors import Diverged, QKDError, Stopped
from qkd.phases import PHASES, Phase
from qkd.quant import (
    calibrate,
    dequantize_model,
    quantization_summary,
    quantize_model,
    quantized_layers,
    recalibrate_bn,
)
from qkd.quant.ste import set_kernel_backend
from qkd.train import live, rundir
from qkd.train.loop import DivergenceGuard, EpochState, Runtime, agreement, train_epoch
from qkd.train.loop import evaluate as top1
from qkd.train.optim import build_optimizer, build_scheduler
from qkd.train.stages import Stage, method_name, plan
from qkd.train.stop import StopRequest

log = logging.getLogger("qkd")

EpochHook = Callable[[dict], None]
EvalFn = Callable[[nn.Module, Iterable], float]
_CALIBRATION_STAGE = 999  # the seed slot of the batches that initialise the quantizers


def epoch_seed(seed: int, stage: int, epoch: int) -> int:
    return (seed * 1_000_003 + stage * 10_007 + epoch) % (2**31)


class Batches:
    """A replayable source of ``(x, y)`` batches: an iterable (``DataLoader``, ``TensorLoader``, list)
    or a zero-argument factory returning one (a generator function). ``len`` is the batches per epoch:
    the source's own, or ``steps`` for sources without one."""

    def __init__(self, source: Any, steps: int | None = None, what: str = "train") -> None:
        if source is None or not (callable(source) or isinstance(source, Iterable)):
            raise QKDError(f"{what} data must be an iterable of (x, y) batches or a function returning one")
        if isinstance(source, Iterator):
            raise QKDError(f"{what} data is a one-pass iterator (e.g. a generator); pass the function that makes it, "
                           "so that every epoch gets a fresh pass")  # fmt: skip
        self.source, self.steps, self.what = source, steps, what

    def __len__(self) -> int:
        if self.steps is not None:
            return self.steps
        try:
            return len(self.source)
        except TypeError:
            raise QKDError(
                f"{self.what} data has no len(); pass steps_per_epoch=N (batches per epoch) for the schedules"
            ) from None

    def epoch(self, seed: int) -> Iterable:
        """The batches of one pass, with every random draw seeded from ``seed``."""
        torch.manual_seed(seed)
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(seed)
        return self

    def __iter__(self) -> Iterator:
        batches = self.source if isinstance(self.source, Iterable) else self.source()
        return iter(itertools.islice(batches, self.steps) if self.steps is not None else batches)


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
        set_kernel_backend(rt.kernels)
        self.train = Batches(train, steps_per_epoch)
        self.evals = {k: Batches(v, what=k) for k, v in (("val", val), ("test", test)) if v is not None}
        self.evaluate_fn = evaluate or self._top1
        self.accuracy = evaluate is None  # the metric is top-1 accuracy (then chance level means something)
        self.on_epoch_end = on_epoch_end
        if any(s.uses_teacher for s in self.stages) and teacher is None:
            used = ", ".join(s.key for s in self.stages if s.uses_teacher)
            raise QKDError(f"stages {used} need a teacher; pass teacher=... or use method='qat' (no teacher)")
        self.student = self._place(self._sync_bn(student))
        self.teacher = self._place(self._sync_bn(teacher)) if teacher is not None else None
        self.describe = {"student": type(student).__name__, "teacher": type(teacher).__name__ if teacher else None}
        self.describe.update(describe or {})
        self.record = record or {"created_by": rundir.PYTHON_API, **self.cfg.model_dump(mode="json"),
                                 "models": {k: self.describe[k] for k in ("student", "teacher")}}  # fmt: skip
        self.state = {"stage": 0, "epoch": 0, "history": [], "results": {}, "student_quantized": False,
                      "num_classes": None, "changes": []}  # fmt: skip
        self.layers: dict | None = None  # quantized/float layer counts, once the student is quantized
        self.quant_table: dict | None = None  # and every layer's bits (quantization.json)
        self.partial: EpochState | None = None  # where a stopped epoch stands
        self.teacher_before: nn.Module | None = None  # in co-study: the teacher as it entered it
        self.events: live.Events | None = None  # TensorBoard, on rank 0 while fit runs
        self.stop = StopRequest()

    def _sync_bn(self, model: nn.Module) -> nn.Module:
        """``runtime.sync_bn``: BatchNorm over the global batch under torchrun (GPUs only; the weights and
        statistics keep their names, so checkpoints load into the plain model)."""
        if not self.cfg.runtime.sync_bn or world_size() == 1:
            return model
        if self.device.type != "cuda":
            raise QKDError("runtime.sync_bn needs GPUs (SyncBatchNorm runs on CUDA only); drop it on the CPU")
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def _top1(self, model: nn.Module, loader: Iterable) -> float:
        return top1(model, loader, self.rt)

    def _place(self, model: nn.Module) -> nn.Module:
        layout = torch.channels_last if self.rt.channels_last else torch.preserve_format
        return model.to(self.device, memory_format=layout)

    # ----- the run -----------------------------------------------------------------------------
    def fit(self, resume: bool = False, overwrite: bool = False) -> FitResult:
        """Run the remaining stages and return the trained models and the summary (``summary.json``).

        With ``resume``, continue from the run folder's last checkpoint (a finished run only reports; a
        folder with no run yet starts one); settings that do not change the models or the data
        (optimizer, distillation, runtime, device) may differ, and the change is recorded.

        Ctrl-C or SIGTERM saves at the next step and raises :class:`~qkd.errors.Stopped`; a diverged loss
        raises :class:`~qkd.errors.Diverged`, keeping the last good checkpoint."""
        self._check_student(resume)
        writer = live.tensorboard_writer(self.cfg.runtime.tensorboard, self.run_dir)
        with self.stop.installed(), live.log_above_bars():
            optim_state = self._open(resume, overwrite)
            self._start_live(writer, resumed=optim_state is not None)
            try:
                while self.state["stage"] < len(self.stages):
                    i = self.state["stage"]
                    stage = self.stages[i]
                    if stage.quantized and not self.state["student_quantized"]:
                        if self.cfg.runtime.eval == "full":
                            self._record_float_results()
                        self._quantize_student()
                        if self.events is not None:
                            self.events.quantized(i, self.student)
                    resumed = self.state["epoch"] > 0 or self.partial is not None
                    self._run_stage(i, stage, optim_state if resumed else None)
                    optim_state = None
            finally:
                if self.events is not None:
                    self.events.close()
                    self.events = None
        if not self.state["student_quantized"]:  # float training only: its models are the results
            for s in self.stages:
                self.state["results"][f"{s.role}_fp"] = _splits(self.state["results"]["stages"][s.key])
        summary = self.summary()
        self._write_json(summary, "summary.json")
        return FitResult(self.student, self.teacher, summary, self.run_dir)

    def _check_student(self, resume: bool) -> None:
        """Before anything is written: the student is float, and quantizes with these settings.

        The trainer quantizes the student itself. One quantized by an interrupted fit in this process
        (resumed with the same objects) goes back to float: the checkpoint then sets every weight. A
        trial quantization of a copy finds a refused layer or a misspelt override now, not after the
        float stages."""
        if next(quantized_layers(self.student), None) is not None:
            if not resume:
                raise QKDError("the student is already quantized; pass its float model (the trainer quantizes it "
                               "with the quant settings) or dequantize_model() it first")  # fmt: skip
            dequantize_model(self.student)
        if any(s.quantized for s in self.stages):
            quantize_model(copy.deepcopy(self.student), self.cfg.quant)

    def _open(self, resume: bool, overwrite: bool) -> dict | None:
        """Start the run folder, or read its last checkpoint back; returns the optimizer state to resume."""
        if self.run_dir is None:
            if resume:
                raise QKDError("resume=True needs the run folder: pass out=...")
            return None
        # the run folder is rank 0's: it decides, reads and writes; the other ranks get what it read
        if on_main(lambda: not resume or not (self.run_dir / "config.yaml").is_file()):  # resume starts a new run
            on_main(lambda: self._init_run_dir(overwrite))
            return None
        changes = on_main(self._check_same_settings)
        ckpt = on_main(lambda: rundir.last_intact_checkpoint(self.run_dir))
        optim_state = self.restore(ckpt) if ckpt is not None else None
        if self.state["stage"] < len(self.stages):  # a finished run only reports: nothing to change or clear
            if changes:
                self._record_changes(changes)
            if is_main_process():
                rundir.clear_exports(self.run_dir)
        return optim_state

    def _start_live(self, writer: type | None, resumed: bool) -> None:
        """On rank 0, when stages are left to run: the start-up banner, and the TensorBoard events where
        ``writer`` (a ``SummaryWriter`` class) is given."""
        if not is_main_process() or self.state["stage"] >= len(self.stages):
            return
        q = self.cfg.quant
        bits = f" at W{q.weight_bits}A{q.act_bits} ({q.method})" if any(s.quantized for s in self.stages) else ""
        n = world_size()
        head = (f"qkd {__version__}: {method_name(self.cfg)}{bits} on {self.device} in {self.rt.precision}, "
                f"{n} process{'es' if n > 1 else ''}\n")  # fmt: skip
        if self.run_dir is None:
            head += "no run folder: nothing is written"
        else:
            events = f", TensorBoard events in {self.run_dir / live.FOLDER}" if writer else ""
            head += f"run folder {self.run_dir}{events}"
        where = self._position() if resumed else None
        log.info("%s", live.banner(head, {"train": self.train, **self.evals}, self.stages, where))
        if writer is not None:
            self.events = live.Events(writer, self.run_dir / live.FOLDER, self.stages, len(self.train),
                                      state=self.state, inside_epoch=self.partial is not None,
                                      student=self.student)  # fmt: skip

    def _init_run_dir(self, overwrite: bool) -> None:
        rundir.check_new(self.run_dir, overwrite)
        rundir.check_room(self.run_dir, [self.student, self.teacher])
        rundir.init(self.run_dir, self.record, self.stages)

    def _check_same_settings(self) -> dict[str, tuple]:
        """The settings that differ from the run folder's: refused where they change the models, the data or
        the plan; returned (``{key: (old, new)}``) where they may change on resume."""
        saved = rundir.read_config(self.run_dir)
        changed = rundir.changed_settings(saved, self.record)
        refused = sorted(k for k in changed if not rundir.may_change_on_resume(k))
        stages = rundir.saved_stages(self.run_dir)
        if stages is not None and [_shape(s) for s in stages] != [_shape(s) for s in self.stages]:
            refused.append("stages (pretrain, phases or epochs)")
        if refused:
            raise QKDError(f"cannot resume {self.run_dir}: its settings differ in {', '.join(refused)}; "
                           "resume with the same settings, or start a new run folder")  # fmt: skip
        return changed

    def _record_changes(self, changes: dict[str, tuple]) -> None:
        where = self._position()
        text = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items())
        if is_main_process():
            log.info("resuming %s with changed settings (from %s): %s", self.run_dir, where, text)
        self.state["changes"].append({"from": where, "changed": {k: list(v) for k, v in changes.items()}})
        rundir.write_settings(self.run_dir, self.record, self.stages)

    def restore(self, ckpt: dict) -> dict:
        """Load a ``last.pt`` snapshot; returns the optimizer/scheduler states it holds."""
        if ckpt["student_quantized"]:
            self._quantize_student(calibrate_batch=False)
        for name, model in (("student", self.student), ("teacher", self.teacher)):
            if model is not None and ckpt.get(name) is not None:
                load_state(model, ckpt[name], f"the {name} of {self.run_dir}")
        self.state = {k: copy.deepcopy(ckpt.get(k, v)) for k, v in self.state.items()}
        if ckpt.get("teacher_before") is not None:  # stopped in co-study: the teacher it started from
            self.teacher_before = copy.deepcopy(self.teacher)
            load_state(self.teacher_before, ckpt["teacher_before"], f"the co-study teacher of {self.run_dir}")
        self.partial = EpochState(**ckpt["partial"]) if ckpt.get("partial") else None
        return ckpt.get("optim") or {}

    def _quantize_student(self, calibrate_batch: bool = True) -> None:
        self._place(quantize_model(self.student, self.cfg.quant))
        layers = quantization_summary(self.student)
        self.quant_table = layers.to_dict()
        self.layers = {"quantized": layers.n_quantized, "float": layers.n_float}
        self._write_json(self.quant_table, "quantization.json")
        if calibrate_batch and is_main_process():
            log.info("student layers (also in quantization.json):\n%s", layers)
        if calibrate_batch:
            batches = (self.rt.batch(b)[0] for b in self.train.epoch(epoch_seed(self.cfg.seed, _CALIBRATION_STAGE, 0)))
            calibrate(self.student, gather(next(batches)))  # under torchrun: from the global batch, on every rank
            # BN statistics of the quantized network (under autocast, as training runs), averaged over ranks
            with self.rt.autocast():
                recalibrate_bn(self.student, itertools.islice(batches, self.cfg.quant.bn_batches))
            average_bn_statistics(self.student)
            broadcast_state(self.student)  # every rank starts from exactly rank 0's state
        self.state["student_quantized"] = True

    def evaluate_splits(self, model: nn.Module) -> dict[str, float]:
        """The metric (top-1 accuracy unless ``evaluate`` was given) on each evaluation split."""
        return self._evaluate_splits(model)

    def _evaluate_splits(self, model: nn.Module, val: float | None = None, splits: list | None = None) -> dict:
        """As :meth:`evaluate_splits` (on ``splits``, default all); ``val``: this very model's validation figure,
        already measured."""
        return {name: val if name == "val" and val is not None else self.evaluate_fn(model, self.evals[name])
                for name in (splits or self.evals)}  # fmt: skip

    def _record_float_results(self) -> None:
        results = self.state["results"]
        results["student_fp"] = self.evaluate_splits(self.student)
        if self.teacher is not None and "teacher_fp" not in results:
            same = _same_weights(self.teacher, self.student)  # self-distillation: one evaluation serves both
            results["teacher_fp"] = dict(results["student_fp"]) if same else self.evaluate_splits(self.teacher)

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
        done = self.state["epoch"] * steps + (self.partial.step if self.partial is not None else 0)
        with live.stage_bar(stage, steps, done) as bar:
            for epoch in range(self.state["epoch"], stage.epochs):
                finished = self._run_epoch(i, stage, epoch, phase, trained, scheds, guard, bar)
                optim = {
                    "opt": {n: o.state_dict() for n, o in phase.optimizers.items()},
                    "sched": [s.state_dict() for s in scheds],
                }
                extra = {"optim": optim, "partial": None if finished else asdict(self.partial)}
                self._save(self._snapshot(extra), "last.pt")
                if finished and self.on_epoch_end is not None:
                    self.on_epoch_end(self.state["history"][-1])
                if self.stop:
                    raise self._stopped()
        self._finish_stage(i, stage, trained)

    def _run_epoch(self, i: int, stage: Stage, epoch: int, phase: Phase, trained: nn.Module, scheds: list,
                   guard: DivergenceGuard, bar: tqdm) -> bool:  # fmt: skip
        """One epoch (or the rest of a stopped one); False when it stopped early on request."""
        batches = self.train.epoch(epoch_seed(self.cfg.seed, i, epoch))
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
        self.state["num_classes"] = metrics.pop("num_classes")
        t_eval = time.perf_counter()
        last_epoch = epoch + 1 == stage.epochs
        if "val" in self.evals and (last_epoch or self.cfg.runtime.eval == "full"):
            measured = self._measure_agreement(stage, "end") if last_epoch else None
            if measured is not None:  # the last epoch of a distillation stage: one pass gives both
                metrics["val_acc"] = measured["student_acc"]
            else:
                metrics["val_acc"] = self.evaluate_fn(trained, self.evals["val"])
            if stage.phase == "co_study":
                teacher_val = measured["teacher_acc"] if measured else self.evaluate_fn(self.teacher, self.evals["val"])
                metrics["teacher_val_acc"] = teacher_val
        eval_s = time.perf_counter() - t_eval
        time_s = metrics.pop("time_s") + eval_s
        record = {"stage": stage.key, "epoch": epoch + 1, "epochs": stage.epochs, **metrics,
                  "lr": scheds[0].get_last_lr()[0], "time_s": time_s, "eval_s": eval_s}  # fmt: skip
        self.state["history"].append(record)
        self.state["epoch"] = epoch + 1
        self._write_metrics()
        if is_main_process():
            log.info(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if self.events is not None:
            self.events.epoch(i, record, self.student)
        return True

    def _finish_stage(self, i: int, stage: Stage, trained: nn.Module) -> None:
        result = {
            "phase": stage.phase,
            "epochs": stage.epochs,
            "quantized": stage.quantized,
            "wall_s": sum(r["time_s"] for r in self.state["history"] if r["stage"] == stage.key),
        }
        last = self.state["history"][-1] if self.state["history"] else {}
        known = last.get("stage") == stage.key and last.get("epoch") == stage.epochs  # its last epoch's val
        splits = list(self.evals)
        if self.cfg.runtime.eval == "lean" and i + 1 < len(self.stages):  # lean: the test split at the end only
            splits = [k for k in splits if k != "test"] or splits
        result.update(self._evaluate_splits(trained, last.get("val_acc") if known else None, splits))
        if stage.phase == "co_study":
            val = last.get("teacher_val_acc") if known else None
            result["teacher"] = self._evaluate_splits(self.teacher, val, splits)
        self._flag_chance(stage, result)
        self._measure_agreement(stage, "end")
        self.teacher_before = None
        self.state["results"].setdefault("stages", {})[stage.key] = result
        if self.events is not None:
            self.events.stage_end(i, result)
        self.state["stage"], self.state["epoch"] = i + 1, 0
        boundary = {
            "state_dict": trained.state_dict(),
            "model": self.describe[stage.role],
            "role": stage.role,
            "stage": stage.key,
            "quantized": stage.quantized,
            "result": result,
            "qkd": self._meta(),
        }
        self._save(boundary, f"{stage.key}.pt")
        self._save(self._snapshot({"partial": None}), "last.pt")

    def _measure_agreement(self, stage: Stage, when: str) -> dict | None:
        """At the start and end of each distillation stage of the student: the teacher's validation top-1 and
        its KL divergence to the quantized student (summary ``teacher_student``); at the end of co-study also
        the KL from the teacher as it entered co-study to the same student (``kl_reference``). Each is
        measured once (the end during the stage's last epoch, whose validation figures it gives)."""
        if not (stage.uses_teacher and stage.role == "student" and self.accuracy and "val" in self.evals):
            return None
        record = self.state["results"].setdefault("teacher_student", {})
        if when in record.get(stage.key, {}):
            return record[stage.key][when]
        keys = list(record)
        if when == "start" and keys and keys[-1] == self.stages[self.state["stage"] - 1].key:
            measured = {k: v for k, v in record[keys[-1]]["end"].items() if k != "kl_reference"}  # same models
        else:
            if stage.phase == "co_study" and when == "start":
                self.teacher_before = copy.deepcopy(self.teacher)
            reference = self.teacher_before if stage.phase == "co_study" and when == "end" else None
            measured = agreement(self.teacher, self.student, self.evals["val"], self.rt, reference)
        record.setdefault(stage.key, {})[when] = measured
        return measured

    def _flag_chance(self, stage: Stage, result: dict) -> None:
        """Mark a stage whose model ends at chance accuracy (within 2 points of 1/classes)."""
        classes, acc = self.state.get("num_classes"), result.get("val", result.get("test"))
        if not self.accuracy or not classes or acc is None or acc > 1 / classes + 0.02:
            return
        result["at_chance"] = True
        if is_main_process():
            log.warning("%s ended at chance accuracy (%.2f %% for %d classes): the %s learned nothing; "
                        "check the learning rate and the data", stage.key, 100 * acc, classes, stage.role)  # fmt: skip

    # ----- failures and stops -----------------------------------------------------------------
    def _position(self) -> str:
        i, epoch = self.state["stage"], self.state["epoch"]
        if i >= len(self.stages):
            return "the end of the run"
        stage = self.stages[i]
        if self.partial is not None:
            return f"{stage.key} epoch {epoch + 1} of {stage.epochs}, after step {self.partial.step}"
        return f"{stage.key} after epoch {epoch} of {stage.epochs}" if epoch else f"the start of {stage.key}"

    def _resume_hint(self, change: str = "") -> str:
        if self.record.get("created_by") == rundir.PYTHON_API:
            return f"fit(..., out={str(self.run_dir)!r}, resume=True{', ' + change if change else ''})"
        return f"qkd run --resume {self.run_dir}{' ' + change if change else ''}"

    def _stopped(self) -> Stopped:
        if self.run_dir is None:
            return Stopped(f"stopped by {self.stop.name} in {self._position()} (nothing saved: no run folder)",
                           self.stop.exit_code)  # fmt: skip
        return Stopped(f"stopped by {self.stop.name} in {self._position()}; saved. Continue with: "
                       f"{self._resume_hint()}", self.stop.exit_code)  # fmt: skip

    def _diverged(self, stage: Stage, epoch: int, scheds: list, e: Diverged) -> Diverged:
        lr = scheds[0].get_last_lr()[0] if scheds else stage.lr
        self.partial = None
        what = f"training diverged in {stage.key} epoch {epoch + 1}: {e}, at learning rate {lr:.3g}"
        if self.run_dir is None:
            return Diverged(f"{what}; lower the learning rate")
        saved = (self.run_dir / "checkpoints" / "last.pt").is_file()
        kept = f"the last good checkpoint is kept ({self._position()})" if saved else "nothing was saved yet"
        key = f"{stage.role}.lr" if not stage.quantized else "optim.lr"
        python = self.record.get("created_by") == rundir.PYTHON_API
        change = f"optim={{'lr': {stage.lr / 10:.3g}}}" if python else f"{key}={stage.lr / 10:.3g}"
        return Diverged(f"{what}; {kept}; continue with a lower learning rate: {self._resume_hint(change)}")

    # ----- persistence -------------------------------------------------------------------------
    def _meta(self) -> dict:
        """What makes a checkpoint self-describing: the settings, the plan, where the run stands, the data's
        normalisation and the quantized layers."""
        return {
            "version": __version__,
            "config": self.record,
            "stages": [asdict(s) for s in self.stages],
            "position": self._position(),
            "finished": self.state["stage"] >= len(self.stages),
            "data": self.describe.get("data"),
            "quantization": self.quant_table,
        }

    def _snapshot(self, extra: dict | None = None) -> dict:
        return {
            **self.state,
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
            "teacher_before": self.teacher_before.state_dict() if self.teacher_before is not None else None,
            **(extra or {}),
            "qkd": self._meta(),
        }

    def _save(self, state: dict, name: str) -> None:
        if self.run_dir is not None:
            save_checkpoint(state, self.run_dir / "checkpoints" / name,
                            keep_previous=rundir.PREVIOUS if name == "last.pt" else None)  # fmt: skip

    def _write_json(self, obj: Any, name: str) -> None:
        if self.run_dir is not None:
            write_json(obj, self.run_dir / name)

    def _write_metrics(self) -> None:
        if self.run_dir is not None:
            lines = "".join(json.dumps(r) + "\n" for r in self.state["history"])
            write_text(lines, self.run_dir / "metrics.jsonl")

    def summary(self) -> dict:
        q = self.cfg.quant
        stages = self.state["results"].get("stages", {})
        return {
            "name": self.run_dir.name if self.run_dir is not None else None,
            "method": method_name(self.cfg),
            "bits": {
                "weight": q.weight_bits,
                "act": q.act_bits,
                "first_last": q.first_last_bits,
                "quantizer": q.method,
                "per_channel": q.per_channel,
            },
            "teacher": self.describe["teacher"],
            "student": self.describe["student"],
            "device": str(self.device),
            "precision": self.rt.precision,  # of the training steps (runtime.amp where the device has bf16)
            "world_size": world_size(),
            "batch_size": (self.describe.get("data") or {}).get("batch_size"),  # the global batch
            "layers": self.layers,
            **self.state["results"],
            "at_chance": [k for k, r in stages.items() if r.get("at_chance")],
            "changes": self.state["changes"],
            "wall_s": sum(r["time_s"] for r in self.state["history"]),
        }


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    """The same class with equal weights and buffers: the same function (self-distillation from the float student)."""
    sa, sb = a.state_dict(), b.state_dict()
    same = type(a) is type(b) and sa.keys() == sb.keys()
    return same and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def _splits(result: dict) -> dict[str, float]:
    return {k: result[k] for k in ("val", "test") if k in result}


def _shape(stage: Stage) -> tuple:
    """What a resumed run must keep of a stage: its learning rates may change."""
    return stage.key, stage.phase, stage.epochs, stage.quantized, stage.role


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
