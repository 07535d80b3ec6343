"""The student's quantization in a run: a trial before anything is written, then the swap and calibration."""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Callable, Iterable
from dataclasses import replace

import torch
from torch import nn
from torch.nn import functional as F

from qkd.distributed import average_bn_statistics, broadcast_state, gather, is_main_process
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
from qkd.quant.adaround import LayerResult, adaround, summary
from qkd.quant.budget import SENSITIVITY_BATCHES, assigned, choose_bits, plan_budget
from qkd.train.loop import Runtime

log = logging.getLogger("qkd")


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
    _bn_statistics(student, quant, rt, inputs)


def _bn_statistics(student: nn.Module, quant: QuantConfig, rt: Runtime, inputs: Iterable) -> None:
    """BN statistics of the quantized network from ``quant.bn_batches`` of ``inputs`` (under autocast, as
    training runs), averaged over ranks; then every rank holds exactly rank 0's state."""
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


def adaround_student(student: nn.Module, float_student: nn.Module, quant: QuantConfig, rt: Runtime,
                     batches: Iterable, stop: Callable[[], bool] | None = None) -> dict:  # fmt: skip
    """AdaRound the calibrated student (:mod:`~qkd.quant.adaround`) on the first ``quant.ptq_images`` images of
    ``batches`` (iterated twice), against ``float_student`` (the float model it was made from), then
    its BatchNorm statistics re-estimated as :func:`calibrate_student` did; rank 0's result on every rank.
    Returns what the summary records of it."""
    images, seen = [], 0
    for batch in batches:
        x = rt.batch(batch)[0]
        images.append(x[: quant.ptq_images - seen])
        seen += len(images[-1])
        if seen >= quant.ptq_images:
            break
    float_student = rt.place(float_student)
    results = adaround(student, float_student, torch.cat(images), quant.ptq_iters, stop, on_layer=_log_layer)
    broadcast_state(student)  # under torchrun each rank rounded on its own shard: rank 0's rounding for all
    # the BN statistics again, now for the rounding chosen: measured on ResNet-20 W4A4 (CIFAR-10 JPEG), 81.7 % test
    # with them, 80.2 % with those of rounding to nearest (81.2 % without AdaRound)
    _bn_statistics(student, quant, rt, (rt.batch(b)[0] for b in batches))
    return {**summary(results), "images": seen, "iters": quant.ptq_iters}


def _log_layer(r: LayerResult) -> None:
    if is_main_process():
        log.info("AdaRound %s: output error %.4g -> %.4g (nearest -> chosen), %.1f %% rounded the other way, %.1f s",
                 r.name, r.nearest, r.adaround, 100 * r.flipped, r.time_s)  # fmt: skip
