"""What a run measures: the metric on the evaluation splits, how close the student is to its teacher, whether a
model ended at chance, and the run's summary (``summary.json``)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from qkd.config import TrainConfig
from qkd.distributed import is_main_process, world_size
from qkd.train.batches import Batches
from qkd.train.loop import Runtime, agreement, top1_accuracy
from qkd.train.stages import Stage, method_name
from qkd.train.state import RunState

log = logging.getLogger("qkd")

EvalFn = Callable[[nn.Module, Iterable], float]


class Measurements:
    """The metric on the evaluation splits: top-1 accuracy, or ``evaluate(model, batches) -> float``.

    It also keeps the teacher as it entered co-study (``teacher_before``), the reference of ``kl_reference``.

    >>> measure = Measurements({"val": Batches(val_loader, what="val")}, Runtime())
    >>> measure.splits(model)     # {"val": 0.93}
    """

    def __init__(self, evals: dict[str, Batches], rt: Runtime, evaluate: EvalFn | None = None) -> None:
        self.evals, self.rt = evals, rt
        self.metric = evaluate or self.top1
        self.accuracy = evaluate is None  # the metric is top-1 accuracy (then chance level means something)
        self.teacher_before: nn.Module | None = None

    def top1(self, model: nn.Module, loader: Iterable) -> float:
        return top1_accuracy(model, loader, self.rt)

    def splits(self, model: nn.Module, val: float | None = None, names: list | None = None) -> dict[str, float]:
        """The metric on each split of ``names`` (default: all); ``val``: this very model's validation figure,
        already measured."""
        return {name: val if name == "val" and val is not None else self.metric(model, self.evals[name])
                for name in (names or self.evals)}  # fmt: skip

    def float_results(self, results: dict, student: nn.Module, teacher: nn.Module | None) -> None:
        """The float models' figures before quantization: ``student_fp``, and ``teacher_fp`` once."""
        results["student_fp"] = self.splits(student)
        if teacher is not None and "teacher_fp" not in results:
            same = same_weights(teacher, student)  # self-distillation: one evaluation serves both
            results["teacher_fp"] = dict(results["student_fp"]) if same else self.splits(teacher)

    def agreement(self, stage: Stage, when: str, results: dict, previous: str, teacher: nn.Module,
                  student: nn.Module) -> dict | None:  # fmt: skip
        """At the start and end of each distillation stage of the student: the teacher's validation top-1 and
        its KL divergence to the quantized student (summary ``teacher_student``); at the end of co-study also
        the KL from the teacher as it entered co-study to the same student (``kl_reference``). Each is
        measured once (the end during the stage's last epoch, whose validation figures it gives); a start
        right after ``previous`` (the stage before) ended is that end's figures, for the same models."""
        if not (stage.uses_teacher and stage.role == "student" and self.accuracy and "val" in self.evals):
            return None
        record = results.setdefault("teacher_student", {})
        if when in record.get(stage.key, {}):
            return record[stage.key][when]
        keys = list(record)
        if when == "start" and keys and keys[-1] == previous:
            measured = {k: v for k, v in record[keys[-1]]["end"].items() if k != "kl_reference"}  # same models
        else:
            if stage.phase == "co_study" and when == "start":
                self.teacher_before = copy.deepcopy(teacher)
            reference = self.teacher_before if stage.phase == "co_study" and when == "end" else None
            measured = agreement(teacher, student, self.evals["val"], self.rt, reference)
        record.setdefault(stage.key, {})[when] = measured
        return measured

    def flag_chance(self, stage: Stage, result: dict, num_classes: int | None) -> None:
        """Mark a stage whose model ends at chance accuracy (within 2 points of 1/classes)."""
        acc = result.get("val", result.get("test"))
        if not self.accuracy or not num_classes or acc is None or acc > 1 / num_classes + 0.02:
            return
        result["at_chance"] = True
        if is_main_process():
            log.warning("%s ended at chance accuracy (%.2f %% for %d classes): the %s learned nothing; check the "
                        "learning rate and the data", stage.key, 100 * acc, num_classes, stage.role)  # fmt: skip


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """The same class with equal weights and buffers: the same function (self-distillation from the float student)."""
    sa, sb = a.state_dict(), b.state_dict()
    same = type(a) is type(b) and sa.keys() == sb.keys()
    return same and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def split_figures(result: dict) -> dict[str, float]:
    """A stage result's figures on the evaluation splits."""
    return {k: result[k] for k in ("val", "test") if k in result}


def summary(cfg: TrainConfig, state: RunState, describe: dict, run_dir: Path | None, rt: Runtime,
            layers: dict | None, budget: dict | None = None) -> dict:  # fmt: skip
    """The run's summary (``summary.json``): settings, models, where it ran, and every result (with
    ``quant.budget``: the bits chosen, against the budget)."""
    q = cfg.quant
    stages = state.results.get("stages", {})
    return {
        "name": run_dir.name if run_dir is not None else None,
        "method": method_name(cfg),
        "bits": {
            "weight": q.weight_bits if q.budget is None else "mixed",
            "act": q.act_bits if q.budget is None else "mixed",
            "first_last": q.first_last_bits,
            "quantizer": q.method,
            "per_channel": q.per_channel,
        },
        "teacher": describe["teacher"],
        "student": describe["student"],
        "device": str(rt.device),
        "precision": rt.precision,  # of the training steps (runtime.amp where the device has bf16)
        "world_size": world_size(),
        "batch_size": (describe.get("data") or {}).get("batch_size"),  # the global batch
        "layers": layers,
        **({"budget": budget} if budget is not None else {}),
        **state.results,
        "at_chance": [k for k, r in stages.items() if r.get("at_chance")],
        "changes": state.changes,
        "wall_s": sum(r["time_s"] for r in state.history) + state.results.get("ptq", {}).get("time_s", 0.0),
    }
