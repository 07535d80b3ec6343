"""Straight-through primitives: pure functions, no state but the kernel backend switch.

Each quantizer has two forms with identical maths:

- a *reference* written with autograd and :func:`round_ste` (short, obviously right; the tests'
  yardstick), and
- a *fused* ``autograd.Function`` whose forward and backward are each one pure function: one pass
  for the output, one pass for the input gradient and the parameter gradients together, with no
  stack of saved temporaries (only the input is saved). The LSQ gradients are those of Esser et al.
  2020 (eq. 3 and 5); the interval gradients are the straight-through derivatives of the reference.

The fused kernels run eagerly, or compiled by ``torch.compile`` into single loops (inductor; C++
on the CPU, Triton on CUDA), which is what makes quantization-aware training cost about as much as
float training. :func:`use_kernel_backend` (a ``with`` block) or :func:`set_kernel_backend` picks;
compilation happens once per process and shape family (``dynamic=True``), and a failure to compile
falls back to eager with a warning.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

log = logging.getLogger("qkd")


def round_ste(x: Tensor) -> Tensor:
    """Round in the forward pass; identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """Value of ``x``, gradient multiplied by ``scale``."""
    return x * scale + (x - x * scale).detach()


def _reduce(t: Tensor, per_channel: bool) -> Tensor:
    """Sum to the parameter's shape: a scalar, or one value per output channel (dim 0, kept dims)."""
    return t.sum(dim=tuple(range(1, t.dim())), keepdim=True) if per_channel else t.sum()


# ----- the kernels: pure functions, compiled or not ------------------------------------------------
def _lsq_fwd(x: Tensor, step: Tensor, qn: Tensor, qp: Tensor) -> Tensor:
    return torch.clamp(torch.round(x / step), qn, qp) * step


def _lsq_bwd(g: Tensor, x: Tensor, step: Tensor, qn: Tensor, qp: Tensor, per_channel: bool) -> tuple[Tensor, Tensor]:
    v = x / step
    inside = (v >= qn) & (v <= qp)
    q = torch.clamp(torch.round(v), qn, qp)
    # d(out)/d(step): round(v) - v inside the range, the clip level (qn or qp) outside it.
    return torch.where(inside, g, 0.0), _reduce(g * torch.where(inside, q - v, q), per_channel)


def _interval_fwd(x: Tensor, lower: Tensor, upper: Tensor, n: Tensor) -> Tensor:
    width = (upper - lower).clamp_min(1e-8)
    z = (torch.minimum(torch.maximum(x, lower), upper) - lower) / width * n
    return torch.round(z) / n * width + lower


def _interval_bwd(
    g: Tensor, x: Tensor, lower: Tensor, upper: Tensor, n: Tensor, per_channel: bool
) -> tuple[Tensor, Tensor, Tensor]:
    width = (upper - lower).clamp_min(1e-8)
    below, above = x < lower, x > upper
    inside = ~(below | above)
    z = (x - lower) / width * n
    d = g * (torch.round(z) - z) / n  # inside: d(out)/d(upper) = (round(z) - z) / n = -d(out)/d(lower)
    g_upper = torch.where(inside, d, torch.where(above, g, 0.0))
    g_lower = torch.where(inside, -d, torch.where(below, g, 0.0))
    return torch.where(inside, g, 0.0), _reduce(g_lower, per_channel), _reduce(g_upper, per_channel)


_EAGER: dict[str, Callable] = {f.__name__: f for f in (_lsq_fwd, _lsq_bwd, _interval_fwd, _interval_bwd)}
_backend = {"name": "eager", "kernels": _EAGER}


_COMPILED: dict[str, Callable] = {}


def set_kernel_backend(name: str) -> None:
    """``"eager"`` (plain PyTorch ops) or ``"compiled"`` (``torch.compile``d fused loops)."""
    if name not in ("eager", "compiled"):
        raise ValueError(f"kernel backend must be 'eager' or 'compiled', not {name!r}")
    if name == "compiled" and not _COMPILED:
        log.info("fake-quant kernels: torch.compile (the first batches compile them, once per process)")
        _COMPILED.update({k: torch.compile(f, dynamic=True) for k, f in _EAGER.items()})
    _backend.update(name=name, kernels=_COMPILED if name == "compiled" else _EAGER)


def kernel_backend() -> str:
    return _backend["name"]


@contextlib.contextmanager
def use_kernel_backend(name: str) -> Iterator[None]:
    """:func:`set_kernel_backend` for the ``with`` block only; the backend before it is back afterwards.

    >>> with use_kernel_backend("compiled"):
    ...     train(model)
    """
    before = _backend["name"]
    set_kernel_backend(name)
    try:
        yield
    finally:
        set_kernel_backend(before)


def _call(name: str, per_channel: bool, *args):
    """Run kernel ``name``; the compiled form only for per-tensor parameters.

    Per-tensor inputs arrive flattened to 1-D (activations: the bulk of the work), so one compiled
    graph with a dynamic length serves every layer. Per-channel inputs are weights: small, each of
    its own static shape, cheaper to run eagerly than to compile for every layer.
    """
    if _backend["name"] == "compiled" and not per_channel:
        # detached: the kernels run inside autograd Functions, and requires_grad or a view's base would
        # otherwise each give the compiled graph one more variant (train vs eval, weights vs activations)
        args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
        try:
            return _backend["kernels"][name](*args)
        except Exception as e:  # no C++ compiler, unsupported platform: stay correct, just slower
            log.warning("compiled quantization kernels unavailable (%s); using eager kernels", str(e).splitlines()[0])
            set_kernel_backend("eager")
    return _EAGER[name](*args)


@functools.lru_cache(maxsize=256)
def _const(value: float, device: torch.device) -> Tensor:
    """A cached 0-d tensor: compiled kernels take clip levels as inputs (no recompile per bit-width)
    and creating them once avoids a host-to-device copy per call on CUDA."""
    return torch.tensor(value, dtype=torch.float32, device=device)


def _identity(t: Tensor) -> Tensor:
    return t


# ----- the fused autograd functions ------------------------------------------------------------------
Reshape = Callable[[Tensor], Tensor]


def _flattener(x: Tensor, per_channel: bool) -> tuple[Reshape, Reshape]:
    """How to read a tensor shaped like ``x`` as 1-D, and the inverse, for per-tensor parameters.

    Elementwise maths does not care about layout, and one contiguous dimension lets the compiled
    loop vectorise. Contiguous and channels_last tensors are read in memory order (a view, no copy);
    any other layout (a slice, a transpose, an ``expand``) in row-major order, copied. The input and
    its gradient go through the same function, so their elements always line up.
    """
    if per_channel:  # weights: broadcasting against (C, 1, ...) parameters works on any layout
        return _identity, _identity
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        n, c, h, w = x.shape
        return (lambda t: t.permute(0, 2, 3, 1).reshape(-1)), (lambda t: t.view(n, h, w, c).permute(0, 3, 1, 2))
    return (lambda t: t.reshape(-1)), (lambda t: t.view(x.shape))


class _LSQFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, qn: int, qp: int, gscale: float) -> Tensor:
        ctx.save_for_backward(x, step)
        per_channel = step.dim() > 0
        ctx.args = (_const(qn, x.device), _const(qp, x.device), gscale, per_channel)
        flat, unflat = _flattener(x, per_channel)
        return unflat(_call("_lsq_fwd", per_channel, flat(x), step, *ctx.args[:2]).to(x.dtype))

    @staticmethod
    def backward(ctx, g: Tensor):
        x, step = ctx.saved_tensors
        qn, qp, gscale, per_channel = ctx.args
        flat, unflat = _flattener(x, per_channel)
        gx, gstep = _call("_lsq_bwd", per_channel, flat(g), flat(x), step, qn, qp, per_channel)
        return unflat(gx.to(x.dtype)), gstep * gscale, None, None, None


class _IntervalFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, lower: Tensor, upper: Tensor, levels: int, gscale: float) -> Tensor:
        ctx.save_for_backward(x, lower, upper)
        per_channel = upper.dim() > 0
        ctx.args = (_const(levels - 1, x.device), gscale, per_channel)
        flat, unflat = _flattener(x, per_channel)
        return unflat(_call("_interval_fwd", per_channel, flat(x), lower, upper, ctx.args[0]).to(x.dtype))

    @staticmethod
    def backward(ctx, g: Tensor):
        x, lower, upper = ctx.saved_tensors
        n, gscale, per_channel = ctx.args
        flat, unflat = _flattener(x, per_channel)
        gx, glower, gupper = _call("_interval_bwd", per_channel, flat(g), flat(x), lower, upper, n, per_channel)
        return unflat(gx.to(x.dtype)), glower * gscale, gupper * gscale, None, None


def lsq_fake_quant(x: Tensor, step: Tensor, qn: int, qp: int, gscale: float) -> Tensor:
    """LSQ fake quantization: ``clamp(round(x / step), qn, qp) * step`` with LSQ gradients.

    ``step`` is a scalar or a per-channel tensor broadcastable over dim 0; ``gscale`` scales its gradient.
    """
    return _LSQFunction.apply(x, step, qn, qp, gscale)


def lsq_reference(x: Tensor, step: Tensor, qn: int, qp: int, gscale: float) -> Tensor:
    """The same maths as :func:`lsq_fake_quant`, written with autograd (for tests)."""
    s = grad_scale(step, gscale)
    return round_ste(torch.clamp(x / s, qn, qp)) * s


def interval_fake_quant(x: Tensor, lower: Tensor, upper: Tensor, levels: int, gscale: float = 1.0) -> Tensor:
    """Interval (QIL-style) fake quantization onto ``levels`` evenly spaced values in [lower, upper].

    Values are clipped to the interval, mapped to [0, 1], rounded to ``levels - 1`` steps and mapped
    back; ``lower`` and ``upper`` get straight-through gradients scaled by ``gscale``. Detach
    ``lower`` to keep it fixed (unsigned inputs keep it at 0).
    """
    return _IntervalFunction.apply(x, lower, upper, levels, gscale)


def interval_reference(x: Tensor, lower: Tensor, upper: Tensor, levels: int, gscale: float = 1.0) -> Tensor:
    """The same maths as :func:`interval_fake_quant`, written with autograd (for tests)."""
    lower, upper = grad_scale(lower, gscale), grad_scale(upper, gscale)
    width = (upper - lower).clamp_min(1e-8)
    unit = (torch.minimum(torch.maximum(x, lower), upper) - lower) / width
    return round_ste(unit * (levels - 1)) / (levels - 1) * width + lower
