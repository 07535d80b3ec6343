"""The three QKD phases: what each trains, with which loss; methods are lists of phases.

A phase holds the student, the teacher and their optimizers, and knows one training step. The loop
only calls ``train_mode()`` and ``step(x, y)``; the trainer builds the optimizers. Baselines are the
same phases in other orders (``METHODS`` in :mod:`qkd.methods`, planned by :mod:`qkd.train.stages`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from qkd.losses import cross_entropy, distillation_loss
from qkd.methods import METHODS, Distill


class Phase:
    """Base class. ``trains_teacher``/``uses_teacher`` tell the pipeline what to build."""

    name: ClassVar[str]
    trains_teacher: ClassVar[bool] = False
    uses_teacher: ClassVar[bool] = False

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        optimizers: dict[str, torch.optim.Optimizer],
        distill: Distill | None = None,
    ) -> None:
        self.student, self.teacher, self.optimizers = student, teacher, optimizers
        self.distill = distill or Distill()

    def train_mode(self) -> None:
        self.student.train()
        if self.teacher is not None:
            self.teacher.train(self.trains_teacher)

    def step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One optimisation step; returns the student's (loss, logits), both detached."""
        raise NotImplementedError

    def _update(self, loss: Tensor, *names: str) -> None:
        for name in names:
            self.optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        for name in names:
            self.optimizers[name].step()


class SelfStudy(Phase):
    """Quantized fine-tuning with the task loss only: a good start for weights and quantizers.

    On a model with no quantizer this is plain float training (used for the teacher and FP student).
    """

    name = "self_study"

    def step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.student(x)
        loss = cross_entropy(logits, y)
        self._update(loss, "student")
        return loss.detach(), logits.detach()


class CoStudy(Phase):
    """Teacher and student learn from each other on the same batch (mutual learning).

    Each loss sees the other model's logits detached, so summing the two losses and calling
    backward once gives each model exactly the gradient of its own loss.
    """

    name = "co_study"
    trains_teacher = True
    uses_teacher = True

    def step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        d = self.distill
        z_s, z_t = self.student(x), self.teacher(x)
        loss_s = distillation_loss(z_s, z_t, y, d.temperature, d.alpha)
        loss_t = distillation_loss(z_t, z_s, y, d.temperature, d.alpha)
        self._update(loss_s + loss_t, "student", "teacher")
        return loss_s.detach(), z_s.detach()


class Tutor(Phase):
    """Distillation from a frozen teacher (eval mode, no gradients)."""

    name = "tutor"
    uses_teacher = True

    def step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with torch.inference_mode():
            z_t = self.teacher(x)
        z_s = self.student(x)
        loss = distillation_loss(z_s, z_t.clone(), y, self.distill.temperature, self.distill.alpha)
        self._update(loss, "student")
        return loss.detach(), z_s.detach()


class PostTraining(Phase):
    """Post-training quantization (``method: ptq``): a stage of no epochs, nothing trained. The trainer quantizes
    and calibrates the student before it (AdaRound too with ``quant.ptq: adaround``) and measures it after."""

    name = "ptq"

    def step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        raise RuntimeError("the ptq phase trains nothing; give it 0 epochs")


PHASES: dict[str, type[Phase]] = {p.name: p for p in (SelfStudy, CoStudy, Tutor, PostTraining)}

__all__ = ["METHODS", "PHASES", "CoStudy", "Distill", "Phase", "PostTraining", "SelfStudy", "Tutor"]
