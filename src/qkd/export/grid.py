"""The front part every exporter shares: each quantizer as an affine integer grid.

Every active quantizer is ``offset + scale * clamp(round((x - offset) / scale), qn, qp)`` (LSQ: offset 0;
interval: offset = lower bound). This module says which quantizers an export takes, reads their grids
and the integer codes of their outputs (from the quantizer's own output, so the codes are the fake-quant
model's, bit for bit), finds a layer's float weight, and refuses a model with nothing quantized. The
exporters (:mod:`~qkd.export.trace`, :mod:`~qkd.export.onnx_qdq`) and the checker
(:mod:`~qkd.export.verify`) take these from here and re-derive none of them.

>>> g = grid("conv.weight_quant", conv.weight_quant)
>>> codes = g.codes(float_weight(conv))          # float64 integers in [g.qn, g.qp]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from qkd.errors import QKDError
from qkd.quant import IntervalQuantizer, LSQQuantizer, Quantizer, quantizers


@dataclass(frozen=True)
class Grid:
    """One quantizer as an affine integer grid: every output is ``offset + scale * code``, ``qn <= code <= qp``.

    ``scale`` and ``offset`` are float64, 0-d (per tensor) or ``(C,)`` (per output channel), as the quantizer
    computes them (:meth:`qkd.quant.Quantizer.affine`)."""

    name: str  # the quantizer's qualified name (the QDQ exporter prefixes its nodes with it)
    quantizer: Quantizer
    scale: Tensor
    offset: Tensor
    qn: int
    qp: int

    @property
    def per_channel(self) -> bool:
        return self.scale.dim() > 0

    def _shape(self, ndim: int) -> tuple[int, ...]:
        return (-1, *[1] * (ndim - 1)) if self.per_channel else ()

    def codes(self, x: Tensor) -> Tensor:
        """The integer codes (float64) of the quantizer's output on ``x`` (channels first), read back from that
        output: the quantizer's own (float32) rounding, bit for bit."""
        shape = self._shape(x.dim())
        with torch.no_grad():
            y = self.quantizer(x).double()
        return torch.clamp(torch.round((y - self.offset.reshape(shape)) / self.scale.reshape(shape)), self.qn, self.qp)

    def values(self, codes: Tensor) -> Tensor:
        """The real values (float64) of integer ``codes``."""
        shape = self._shape(codes.dim())
        return self.offset.reshape(shape) + self.scale.reshape(shape) * codes


def _flat(t: Tensor) -> Tensor:
    """A per-tensor parameter as a 0-d float64 tensor, a per-channel one (C, 1, ...) as (C,)."""
    t = t.detach().double().cpu()
    return t.reshape(()) if t.dim() == 0 else t.reshape(-1)


def check_quantizer(name: str, q: Quantizer) -> None:
    """A one-line :class:`QKDError` for a quantizer no export takes: another kind than LSQ and interval, or
    one never initialised."""
    if not bool(q.initialized):
        raise QKDError(f"quantizer '{name}' was never initialised; calibrate or train the model before export")
    if not isinstance(q, LSQQuantizer | IntervalQuantizer):
        raise QKDError(f"quantizer '{name}' is a {type(q).__name__}; qkd exports LSQ and interval quantizers")


def grid(name: str, q: Quantizer) -> Grid:
    """The grid of quantizer ``q`` (named ``name`` in messages), checked by :func:`check_quantizer`."""
    check_quantizer(name, q)
    scale, offset, qn, qp = q.affine()
    return Grid(name, q, _flat(scale), _flat(offset), int(qn), int(qp))


def activation_grid(name: str, q: Quantizer) -> Grid:
    """:func:`grid` of an activation quantizer, which every export takes per tensor only."""
    g = grid(name, q)
    if g.per_channel:
        raise QKDError(f"activation quantizer '{name}' is per channel; qkd exports per-tensor activations")
    return g


def layer_grids(name: str, wq: Quantizer, aq: Quantizer) -> tuple[Grid, Grid]:
    """The weight and input grids of quantized layer ``name``, which the integer program needs both of."""
    if not (wq.active and aq.active):
        raise QKDError(f"layer '{name}' is not quantized on both weights and input; the integer formats need "
                       "every Conv/Linear quantized (set quant.first_last_bits to 8, not float)")  # fmt: skip
    return grid(f"{name}.weight_quant", wq), activation_grid(f"{name}.act_quant", aq)


def float_weight(layer: nn.Module) -> Tensor:
    """A quantized layer's float weight: the parameter its weight quantizer reads (swapped or in place)."""
    return layer.parametrizations.weight.original if hasattr(layer, "parametrizations") else layer.weight


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every layer of ``model`` holding a weight quantizer, with its qualified name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(getattr(m, "weight_quant", None), Quantizer)]


def check_quantized(model: nn.Module) -> None:
    """The one refusal of a model without an active quantizer, for every format."""
    if not any(q.active for _, q in quantizers(model)):
        raise QKDError(f"{type(model).__name__} has no quantized layers; export the student of a quantized run")


def fold_batchnorm(codes: np.ndarray, scale: np.ndarray, bias: np.ndarray | float, bn: tuple[np.ndarray, ...],
                   eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """An inference BatchNorm after a layer of weights ``codes * scale`` (per output channel, offset 0) folded into
    it: ``(codes, scale, bias)`` with the scale multiplied by ``|gamma / sqrt(var + eps)|`` per channel, the codes of
    a channel of negative factor negated (every scale stays positive: the same integers up to their sign), and the
    bias of the folded layer. ``bn`` is ``(gamma, beta, running_mean, running_var)``; everything in float64. The
    exporters that fold BN (QDQ ONNX, ExecuTorch) take it from here."""
    gamma, beta, mean, var = (np.asarray(t, dtype=np.float64) for t in bn)
    factor = gamma / np.sqrt(var + eps)
    sign = np.where(factor < 0, -1, 1)
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), (codes.shape[0],)) * np.abs(factor)
    codes = codes * sign.reshape((-1,) + (1,) * (codes.ndim - 1))
    return codes, scale, beta + (np.asarray(bias, dtype=np.float64) - mean) * factor
