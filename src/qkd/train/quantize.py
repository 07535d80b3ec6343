"""The student's quantization in a run: a trial before anything is written, then the swap and calibration."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable
from dataclasses import replace

from torch import nn
from torch.nn import functional as F

from qkd.distributed import average_bn_statistics, broadcast_state, gather
from qkd.errors import QKDError
from qkd.quant import (
    QuantConfig,
    QuantSummary,
    calibrate,
    dequantize_model,
    quantization_summary,
    quantize_model,
    quantized_layers,
    recalibrate_bn,
)
from qkd.quant.budget import SENSITIVITY_BATCHES, assigned, choose_bits, plan_budget
from qkd.train.loop import Runtime


def check_float_student(student: nn.Module, quant: QuantConfig | None, resume: bool) -> None:
    """Before anything is written: the student is float, and quantizes with ``quant`` (None: no stage quantizes).

    The trainer quantizes the student itself. One quantized by an interrupted fit in this process
    (resumed with the same objects) goes back to float: the checkpoint then sets every weight. A
    trial quantization of a copy finds a refused layer or a misspelt override now, not after the
    float stages."""
    if next(quantized_layers(student), None) is not None:
        if not resume:
            raise QKDError("the student is already quantized; pass its float model (the trainer quantizes it "
                           "with the quant settings) or dequantize_model() it first")  # fmt: skip
        dequantize_model(student)
    if quant is not None:
        quantize_model(copy.deepcopy(student), replace(quant, budget=None))  # the budget's bits: chosen later


def quantize_student(student: nn.Module, quant: QuantConfig, rt: Runtime) -> QuantSummary:
    """Swap the student's layers for quantized ones (in place, placed as ``rt`` says); returns every layer's bits."""
    rt.place(quantize_model(student, quant))
    return quantization_summary(student)


def calibrate_student(student: nn.Module, quant: QuantConfig, rt: Runtime, batches: Iterable) -> None:
    """Initialise the quantizers from the first batch of ``batches`` (a seeded pass of the training data) and
    the BatchNorm statistics of the quantized network from the next ones, alike on every rank."""
    inputs = (rt.batch(b)[0] for b in batches)
    calibrate(student, gather(next(inputs)))  # under torchrun: from the global batch, on every rank
    # BN statistics of the quantized network (under autocast, as training runs), averaged over ranks
    with rt.autocast():
        recalibrate_bn(student, itertools.islice(inputs, quant.bn_batches))
    average_bn_statistics(student)
    broadcast_state(student)  # every rank starts from exactly rank 0's state


def choose_student_bits(student: nn.Module, quant: QuantConfig, rt: Runtime, batches: Iterable) -> dict:
    """The bits of each layer within ``quant.budget`` (:func:`~qkd.quant.budget.choose_bits`), the sensitivities
    measured by the cross-entropy on the first batches of ``batches`` (a seeded pass of the training data)."""
    measured = [rt.batch(b) for b in itertools.islice(batches, SENSITIVITY_BATCHES)]
    if not measured:
        raise QKDError("the train data gave no batch to measure the layers' sensitivity on")
    plan = plan_budget(student, quant, measured[0][0])
    return choose_bits(student, quant, plan, measured, F.cross_entropy)


def recorded_budget(ckpt: dict) -> dict | None:
    """The bits a run chose within ``quant.budget``, as its checkpoint (any of them) records them."""
    return ((ckpt.get("qkd") or {}).get("quantization") or {}).get("budget")


def budget_config(quant: QuantConfig, budget: dict | None) -> QuantConfig:
    """``quant`` as it quantizes: with ``quant.budget``, the chosen bits (``budget``, as recorded) per layer."""
    if quant.budget is None:
        return quant
    if budget is None:
        raise QKDError("this run has quant.budget but its checkpoint records no bits chosen for it (written by an "
                       "older qkd?); start the run again")  # fmt: skip
    return assigned(quant, budget["bits"])
