"""Trainable uniform quantizers: LSQ (learned step) and interval (learned lower/upper bounds).

A quantizer is a small module that fake-quantizes one tensor. Its parameters are initialised from
data the first time it sees a tensor (weights: at creation; activations: on the first batch) and the
``initialized`` and ``signed`` buffers travel in the state dict, so a reloaded model needs no data.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from qkd.quant.config import QuantSpec
from qkd.quant.ste import interval_fake_quant, lsq_fake_quant, round_ste

QUANTIZERS: dict[str, type[Quantizer]] = {}
MSE_CANDIDATES = 100  # clipping ranges tried by the ``mse`` initialisation
MSE_SAMPLE = 2**20  # elements of an activation batch it looks at (evenly strided)
MIN_STEP = 1e-8


def _register(name: str) -> Callable[[type[Quantizer]], type[Quantizer]]:
    def deco(cls: type[Quantizer]) -> type[Quantizer]:
        QUANTIZERS[name] = cls
        return cls

    return deco


def _channel_shape(x: Tensor, per_channel: bool) -> tuple[int, ...]:
    return (x.shape[0],) + (1,) * (x.dim() - 1) if per_channel else ()


def _reduce_dims(x: Tensor, per_channel: bool) -> tuple[int, ...]:
    return tuple(range(1, x.dim())) if per_channel else tuple(range(x.dim()))


@torch.no_grad()
def mse_step(x: Tensor, qn: int, qp: int, per_channel: bool) -> Tensor:
    """The step (per channel or per tensor) minimising ``mean((Q(x) - x)**2)``.

    Tries steps ``alpha * max|x| / qp`` for ``alpha`` in (0, 1]: at 2-4 bits the best clip is far
    below the largest value, and a step set from the mean alone collapses a pretrained network.
    """
    x = x.reshape(x.shape[0], -1) if per_channel else x.reshape(1, -1)
    if x.shape[1] > MSE_SAMPLE:
        x = x[:, :: -(-x.shape[1] // MSE_SAMPLE)]
    max_abs = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-8)
    best_err, best = torch.full_like(max_abs, float("inf")), max_abs / qp
    for alpha in torch.linspace(1.0 / MSE_CANDIDATES, 1.0, MSE_CANDIDATES).tolist():
        step = alpha * max_abs / qp
        err = ((torch.clamp(torch.round(x / step), qn, qp) * step - x) ** 2).mean(dim=1, keepdim=True)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, step, best)
    return best.reshape(-1) if per_channel else best.reshape(())


class Quantizer(nn.Module):
    """Base class: bit-width, sign, on/off switch and data-driven initialisation."""

    def __init__(self, spec: QuantSpec, init: Tensor | None = None) -> None:
        super().__init__()
        self.bits = spec.bits
        self.per_channel = spec.per_channel
        self.channel_dim = spec.channel_dim if spec.per_channel else 0
        self.step_init = spec.step_init
        self.integer_zero_point = spec.integer_zero_point
        self.auto_sign = spec.signed is None
        self.enabled = True
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("signed", torch.tensor(bool(spec.signed)))
        if init is not None:
            init = init.transpose(0, self.channel_dim)
        self._make_params(_channel_shape(init, spec.per_channel) if init is not None else ())
        if init is not None and self.bits is not None:
            self.initialize(init)

    @property
    def qn(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qp(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def active(self) -> bool:
        return self.enabled and self.bits is not None

    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return x
        if x.dtype in (torch.bfloat16, torch.float16):  # under autocast: round in float32, the grid stays exact
            x = x.float()
        if self.channel_dim:  # the parameters and kernels expect the channels in dim 0
            return self._init_and_quantize(x.transpose(0, self.channel_dim)).transpose(0, self.channel_dim)
        return self._init_and_quantize(x)

    def _init_and_quantize(self, x: Tensor) -> Tensor:
        if not self.initialized:
            self.initialize(x)
        return self.quantize(x)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set the sign (when automatic) and the parameters from the statistics of ``x``."""
        if self.auto_sign:
            self.signed.fill_(bool(x.min() < 0))
        self._init_params(x.detach().float())
        self.initialized.fill_(True)

    def _grad_scale(self, x: Tensor) -> float:
        per_param = x.numel() // x.shape[0] if self.per_channel else x.numel()
        return 1.0 / math.sqrt(per_param * max(self.qp, 1))

    def extra_repr(self) -> str:
        bits = "float" if self.bits is None else f"{self.bits}"
        dim = f", channel_dim={self.channel_dim}" if self.channel_dim else ""
        return f"bits={bits}, signed={bool(self.signed)}, per_channel={self.per_channel}{dim}"

    # Subclasses define their parameters, their initialisation and the quantization itself.
    def _make_params(self, shape: tuple[int, ...]) -> None:
        raise NotImplementedError

    def _init_params(self, x: Tensor) -> None:
        raise NotImplementedError

    def quantize(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def affine(self) -> tuple[Tensor, Tensor, int, int]:
        """The grid in use as ``(scale, offset, qn, qp)``, detached: every output is
        ``offset + scale * code`` with an integer ``qn <= code <= qp`` (what the exporters store)."""
        raise NotImplementedError


@_register("lsq")
class LSQQuantizer(Quantizer):
    """Learned step size quantization (Esser et al., ICLR 2020).

    >>> q = LSQQuantizer(QuantSpec(bits=2, signed=False))
    >>> y = q(torch.rand(16, 8))  # step initialised from this batch, values on 4 levels
    """

    def _make_params(self, shape: tuple[int, ...]) -> None:
        self.step = nn.Parameter(torch.ones(shape))

    def _init_params(self, x: Tensor) -> None:
        if self.step_init == "lsq":
            mean_abs = x.abs().mean(dim=_reduce_dims(x, self.per_channel), keepdim=self.per_channel)
            step = 2 * mean_abs / math.sqrt(self.qp)
        else:
            step = mse_step(x, self.qn, self.qp, self.per_channel)
        self.step.copy_(step.clamp_min(MIN_STEP).reshape(self.step.shape))

    def quantize(self, x: Tensor) -> Tensor:
        return lsq_fake_quant(x, self._step(), self.qn, self.qp, self._grad_scale(x))

    def _step(self) -> Tensor:
        # An optimizer step can push a small step (8-bit edge layers) through zero: the magnitude is
        # the step in use, so the quantizer stays valid and the gradient keeps pointing the right way.
        return self.step.abs().clamp_min(MIN_STEP)

    def scale(self) -> Tensor:
        """The step in use, detached: the real value of one integer unit."""
        return self._step().detach()

    def affine(self) -> tuple[Tensor, Tensor, int, int]:
        scale = self.scale()
        return scale, torch.zeros_like(scale), self.qn, self.qp


@_register("interval")
class IntervalQuantizer(Quantizer):
    """Learned clipping interval (QIL-style): 2^bits levels evenly spread over [lower, upper].

    Unsigned inputs keep ``lower`` at 0 so that zero stays exact (ReLU outputs, zero padding).
    With ``integer_zero_point`` the interval in use is the learned one shifted (by under half a step) so that
    ``lower`` is an integer multiple of the step: the grid's zero point ``-lower / step`` is then an integer.
    """

    def _make_params(self, shape: tuple[int, ...]) -> None:
        self.lower = nn.Parameter(torch.zeros(shape))
        self.upper = nn.Parameter(torch.ones(shape))

    def _init_params(self, x: Tensor) -> None:
        dims = _reduce_dims(x, self.per_channel)
        lo, hi = x.amin(dim=dims, keepdim=self.per_channel), x.amax(dim=dims, keepdim=self.per_channel)
        # A single value per channel (e.g. Linear(1, n)) has no sample std: use 0 there, not NaN.
        correction = min(1, x.numel() // lo.numel() - 1)
        mean = x.mean(dim=dims, keepdim=self.per_channel)
        std = x.std(dim=dims, keepdim=self.per_channel, correction=correction)
        upper = torch.minimum(hi, mean + 3 * std)
        lower = torch.maximum(lo, mean - 3 * std) if self.signed else torch.zeros_like(upper)
        upper = torch.maximum(upper, lower + 1e-4)
        self.lower.copy_(lower.reshape(self.lower.shape))
        self.upper.copy_(upper.reshape(self.upper.shape))

    def quantize(self, x: Tensor) -> Tensor:
        lower = self.lower if self.signed else self.lower.detach()
        upper = self.upper
        if self.integer_zero_point:
            lower, upper = self._snapped(lower, upper)
        return interval_fake_quant(x, lower, upper, 2**self.bits, self._grad_scale(x))

    def interval(self) -> tuple[float, float]:
        """The interval the forward uses (float32; snapped with ``integer_zero_point``), detached."""
        lower, upper = self.lower.detach(), self.upper.detach()
        if self.integer_zero_point:
            lower, upper = self._snapped(lower, upper)
        return float(lower), float(upper)

    def _snapped(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        """The interval of the same width whose lower bound is the nearest integer multiple of the step; the
        rounding is straight-through, so ``lower`` and ``upper`` learn as without it."""
        width = (upper - lower).clamp_min(1e-8)
        step = width / (2**self.bits - 1)
        lower = round_ste(lower / step) * step
        return lower, lower + width

    def affine(self) -> tuple[Tensor, Tensor, int, int]:
        # in float64: the grid itself, not one more float32 rounding of it (the exporters store what they need)
        levels = 2**self.bits - 1
        lower = self.lower.detach().double()
        width = (self.upper.detach().double() - lower).clamp_min(1e-8)  # as in the fake-quant kernel
        if self.integer_zero_point:  # the zero point the forward rounded to (in its float32), times the step
            step32 = (self.upper.detach() - self.lower.detach()).clamp_min(1e-8) / levels
            lower = torch.round(self.lower.detach() / step32).double() * (width / levels)
        return width / levels, lower, 0, levels


def make_quantizer(spec: QuantSpec, init: Tensor | None = None) -> Quantizer:
    """Build the quantizer ``spec.method`` names; ``init`` initialises it at once (weights)."""
    return QUANTIZERS[spec.method](spec, init)
