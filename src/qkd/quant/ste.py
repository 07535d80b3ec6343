"""Straight-through primitives: pure functions, no state.

The fused LSQ function computes the fake-quantized tensor and, in one backward pass, the gradients
for the input and the step (Esser et al. 2019, eq. 3 and 5). `lsq_reference` is the same maths with
plain autograd and is what the tests compare against.
"""

from __future__ import annotations

import torch
from torch import Tensor


def round_ste(x: Tensor) -> Tensor:
    """Round in the forward pass; identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """Value of ``x``, gradient multiplied by ``scale``."""
    return x * scale + (x - x * scale).detach()


def _reduce_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``grad`` down to a broadcastable ``shape`` (a scalar or a per-channel step)."""
    if grad.shape == shape:
        return grad
    if len(shape) == 0:
        return grad.sum()
    dims = [i for i, n in enumerate(shape) if n == 1]
    return grad.sum(dim=dims, keepdim=True)


class _LSQFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, qn: int, qp: int, gscale: float) -> Tensor:
        v = x / step
        q = torch.clamp(torch.round(v), qn, qp)
        ctx.save_for_backward(v, step)
        ctx.qn, ctx.qp, ctx.gscale = qn, qp, gscale
        return q * step

    @staticmethod
    def backward(ctx, g: Tensor):
        v, step = ctx.saved_tensors
        below, above = v < ctx.qn, v > ctx.qp
        inside = ~(below | above)
        grad_x = g * inside
        # d(out)/d(step): round(v) - v inside the range, the clip level outside it.
        dstep = torch.where(inside, torch.round(v) - v, torch.where(below, float(ctx.qn), float(ctx.qp)))
        grad_step = _reduce_to(g * dstep, step.shape) * ctx.gscale
        return grad_x, grad_step, None, None, None


def lsq_fake_quant(x: Tensor, step: Tensor, qn: int, qp: int, gscale: float) -> Tensor:
    """LSQ fake quantization: ``clamp(round(x / step), qn, qp) * step`` with LSQ gradients.

    ``step`` is a scalar or broadcastable per-channel tensor; ``gscale`` scales the step gradient.
    """
    return _LSQFunction.apply(x, step, qn, qp, gscale)


def lsq_reference(x: Tensor, step: Tensor, qn: int, qp: int, gscale: float) -> Tensor:
    """The same maths as :func:`lsq_fake_quant`, written with autograd (for tests)."""
    s = grad_scale(step, gscale)
    return round_ste(torch.clamp(x / s, qn, qp)) * s


def interval_fake_quant(x: Tensor, lower: Tensor, upper: Tensor, levels: int) -> Tensor:
    """Interval (QIL-style) fake quantization onto ``levels`` evenly spaced values in [lower, upper].

    Values are clipped to the interval, mapped to [0, 1], rounded to ``levels - 1`` steps and mapped
    back; gradients reach ``lower`` and ``upper`` through the mapping (straight-through rounding).
    """
    width = (upper - lower).clamp_min(1e-8)
    unit = (torch.minimum(torch.maximum(x, lower), upper) - lower) / width
    return round_ste(unit * (levels - 1)) / (levels - 1) * width + lower
