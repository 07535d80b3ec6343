"""The integer program: the one format every exporter and runtime shares.

A program is a list of ops (dicts: ``name``, ``op``, ``in``, attributes) plus tensors named
``<op name>.<field>``; :mod:`qkd.export.trace` builds it from a quantized model. Every backend
(the int runtime, the integer ONNX exporter) implements each op of :data:`OPS` as a method
``_<op>`` (the tests check it).

Between layers the values are int64 fixed point with :data:`FRAC_BITS` fraction bits (finer than
float32 at these magnitudes), so the integer program follows the fake-quant model's rounding
decisions rather than adding its own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

FRAC_BITS = 32  # fixed-point fraction bits of the int64 tensors between layers (range +-2**30)

LAYERS = ("qconv2d", "qlinear")
ACTIVATIONS = ("relu", "relu6", "hardswish", "hardsigmoid", "silu", "sigmoid")
SHAPE_OPS = ("slice", "pad", "chunk", "cat", "reshape", "permute", "flatten", "maxpool")  # values pass unchanged
OPS = (*LAYERS, *ACTIVATIONS, *SHAPE_OPS, "input", "output", "add", "mul", "add_const", "scale", "affine",
       "mean_hw", "avgpool", "adaptive_avgpool")  # fmt: skip

# A layer's real output is a sum of integer terms, each with its own real multiplier (affine grids:
# input ``oa + sa * ca``, weight ``ow[c] + sw[c] * cw``; padding contributes exact zeros):
#   sa sw conv(ca, cw) + sa ow conv(ca, 1) + oa sw conv(valid, cw) + oa ow conv(valid, 1)
# LSQ grids have zero offsets, so only the first term remains (the usual integer layer). The keys
# name the terms: "" (codes x codes), "xsum" (input code sums), "wsum" and "count" (over the
# unpadded window); a layer's file holds ``mult_<key>``/``shift_<key>`` only for the terms it has.
TERMS = ("", "xsum", "wsum", "count")


def missing_ops(backend: type) -> list[str]:
    """The ops of :data:`OPS` that ``backend`` (a class dispatching to ``_<op>`` methods) does not implement."""
    return [op for op in OPS if not callable(getattr(backend, f"_{op}", None))]


def pool_windows(op: dict[str, Any], size: int, axis: int) -> tuple[Tensor, Tensor]:
    """One spatial axis of an ``avgpool`` / ``adaptive_avgpool`` op over an input of ``size``: a 0/1
    matrix ``(out, size)`` whose row ``i`` selects window ``i``'s inputs, and each window's divisor.

    Both pools are separable: a window's sum is ``rows @ x @ cols.T`` and its divisor the product of
    the two axes' divisors (PyTorch's ``avg_pool2d`` / ``adaptive_avg_pool2d`` rules, ceil mode and
    ``count_include_pad`` included).
    """
    if op["op"] == "adaptive_avgpool":
        out = op["output_size"][axis]
        starts = [i * size // out for i in range(out)]
        ends = [-(-(i + 1) * size // out) for i in range(out)]
        counts = [e - s for s, e in zip(starts, ends)]
    else:
        k, s, p = op["kernel"][axis], op["stride"][axis], op["padding"][axis]
        out = (size + 2 * p - k + (s - 1 if op["ceil_mode"] else 0)) // s + 1
        if op["ceil_mode"] and (out - 1) * s >= size + p:
            out -= 1
        starts = [i * s - p for i in range(out)]
        ends = [min(b + k, size + p) for b in starts]
        counts = [e - b for b, e in zip(starts, ends)]
        starts, ends = [max(b, 0) for b in starts], [min(e, size) for e in ends]
        if not op["count_include_pad"]:
            counts = [e - b for b, e in zip(starts, ends)]
    rows = torch.zeros(out, size, dtype=torch.long)
    for i, (b, e) in enumerate(zip(starts, ends)):
        rows[i, b:e] = 1
    return rows, torch.tensor(counts, dtype=torch.long)
