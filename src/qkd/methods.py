"""What each method is (its list of phases) and the distillation loss's settings: plain data, no torch, so that
a config is read and checked without it. The phases themselves are in :mod:`qkd.phases`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Distill:
    """The distillation loss ``CE + alpha * T^2 * KL(p_teacher || p_student)``: ``temperature`` T, weight ``alpha``.

    Also the ``distill`` section of a run config (pydantic validates this dataclass there).
    """

    __pydantic_config__ = {"extra": "forbid"}

    temperature: float = 2.0
    alpha: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")


#: Methods are phase lists; the budget is split by the spec's 15/50/35 proportions (``split``), shared among a
#: method's own phases in those proportions. ``ptq`` trains nothing: one stage of no epochs, in which the student
#: is quantized and calibrated (``quant.ptq``), then measured.
METHODS: dict[str, tuple[str, ...]] = {
    "qkd": ("self_study", "co_study", "tutor"),
    "qat": ("self_study",),
    "kd": ("tutor",),
    "ss+tu": ("self_study", "tutor"),
    "cs+tu": ("co_study", "tutor"),
    "ptq": ("ptq",),
}
