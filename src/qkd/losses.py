"""Task and distillation losses as plain functions."""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), target)  # float32 under autocast too


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch.

    The teacher side is detached: each model learns only from its own loss (Hinton et al. 2015).
    """
    t = temperature
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()  # float32 under autocast too
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: float, alpha: float
) -> Tensor:
    """``CE(student, y) + alpha * T^2 * KL(p_teacher || p_student)``: the QKD student/teacher loss."""
    return cross_entropy(student_logits, target) + alpha * kd_loss(student_logits, teacher_logits, temperature)
