"""Planning: a method (or an explicit phase list) and a budget become a list of stages.

Float training of the teacher and of the student (when asked) come first, then the method's
quantized phases. Each stage is one phase with its own epochs and learning rates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qkd.config import TrainConfig
from qkd.phases import METHODS, PHASES

_SPLIT_INDEX = {"self_study": 0, "co_study": 1, "tutor": 2}


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

    @property
    def uses_teacher(self) -> bool:
        return self.role == "teacher" or PHASES[self.phase].uses_teacher


def split_epochs(phases: tuple[str, ...], split: tuple[float, ...], total: int) -> list[int]:
    """Share ``total`` epochs between ``phases`` by their ``split`` weights (largest remainder)."""
    weights = [split[_SPLIT_INDEX[p]] for p in phases]
    exact = [total * w / sum(weights) for w in weights]
    epochs = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: epochs[i] - exact[i])
    for i in by_remainder[: total - sum(epochs)]:
        epochs[i] += 1
    return epochs


def float_stage(role: str, epochs: int, lr: float) -> Stage:
    """Plain float training of ``role`` (teacher or student) with the task loss."""
    return Stage(f"fp_{role}", "self_study", epochs, lr, lr, quantized=False, role=role)


def quantized_stages(cfg: TrainConfig) -> list[Stage]:
    """The method's quantized phases (or ``cfg.phases``), numbered ``1_self_study``, ``2_co_study``, ...;
    ``method: ptq`` is one stage ``1_ptq`` of 0 epochs."""
    if cfg.phases is not None:
        spec = [(p.name, p.epochs, p.lr, p.teacher_lr) for p in cfg.phases]
    elif cfg.method == "ptq":  # post-training quantization: nothing trained, so no epochs
        spec = [("ptq", 0, None, None)]
    else:
        names = METHODS[cfg.method]
        spec = [(n, e, None, None) for n, e in zip(names, split_epochs(names, cfg.split, cfg.epochs))]
    return [
        Stage(f"{i + 1}_{name}", name, epochs, lr or cfg.optim.lr, tlr or cfg.optim.teacher_lr, quantized=True)
        for i, (name, epochs, lr, tlr) in enumerate(spec)
    ]


def plan(cfg: TrainConfig, float_training: dict[str, tuple[int, float]] | None = None) -> list[Stage]:
    """Float training where asked (``{role: (epochs, lr)}``), then the quantized phases.

    The teacher is trained only when some phase uses it.
    """
    quant = quantized_stages(cfg)
    roles = ("teacher", "student") if any(s.uses_teacher for s in quant) else ("student",)
    floats = [float_stage(r, *(float_training or {}).get(r, (0, cfg.optim.lr))) for r in roles]
    return [s for s in floats if s.epochs > 0] + quant


def method_name(cfg: TrainConfig) -> str:
    return cfg.method if cfg.phases is None else "custom"
