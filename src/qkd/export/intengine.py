"""The integer reference engine: runs an integer program (see :mod:`qkd.export.intgraph`) on the CPU.

Activations entering a layer are its low-bit integers; weights are low-bit integers; accumulation
is exact integer arithmetic checked to stay within int32; requantization between layers is an
integer multiply and a rounding right shift. Convolutions run as float64 convolutions of integer
values, which are exact far beyond the int32 range, so the results are those of integer hardware.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from qkd.errors import QKDError
from qkd.export.intgraph import FRAC_BITS

INT32 = 2**31


def shift_round(v: Tensor, mult: Tensor, shift: Tensor) -> Tensor:
    """``round(v * mult / 2**shift)`` in int64: the fixed-point requantization (round half up)."""
    prod = v * mult
    return torch.bitwise_right_shift(prod + torch.bitwise_left_shift(torch.ones_like(shift), shift - 1), shift)


def _check_int32(t: Tensor, what: str) -> Tensor:
    if t.numel() and (t.max() >= INT32 or t.min() < -INT32):
        raise QKDError(f"{what} overflows int32")
    return t


def _exact_dtype(x: Tensor, w: Tensor) -> torch.dtype:
    """float32 when no partial sum can exceed 2**24 (then every integer in it is exact), else float64.

    The bound is max|x| * max over output channels of sum|w|: low-bit layers nearly always qualify,
    which lets the fast float32 kernels compute the exact integer accumulation.
    """
    bound = int(x.abs().max()) * int(w.abs().flatten(1).sum(1).max())
    return torch.float32 if bound < 2**24 else torch.float64


def _channels(t: Tensor, dim: int) -> Tensor:
    """A per-output-channel vector shaped to broadcast over an (N, C, ...) tensor of ``dim`` dims."""
    return t.view(1, -1, *[1] * (dim - 2))


class IntEngine:
    """Callable integer network: ``IntEngine(ops, tensors)(x) -> logits`` (float, for reading only).

    >>> engine = IntEngine(*to_int_program(student))
    >>> logits = engine(images)
    """

    def __init__(self, ops: list[dict], tensors: dict[str, Tensor]) -> None:
        self.ops = ops
        self.t = {k: v.long() if not v.is_floating_point() else v for k, v in tensors.items()}

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        env: dict[str, Tensor] = {}
        for op in self.ops:
            args = [env[i] for i in op["in"]]
            env[op["name"]] = getattr(self, "_" + op["op"])(op, *args) if op["op"] != "input" else x
            if op["op"] == "output":
                return env[op["name"]]
        raise QKDError("integer program has no output op")

    def _layer_input(self, op: dict, x: Tensor) -> Tensor:
        lo, hi = op["a_range"]
        if x.is_floating_point():  # the network's input: quantized exactly as the fake-quant model does
            return torch.clamp(torch.round(x / op["a_scale"]), lo, hi).long()
        name = op["name"]
        return torch.clamp(shift_round(x, self.t[f"{name}.in_mult"], self.t[f"{name}.in_shift"]), lo, hi)

    def _requant(self, op: dict, acc: Tensor) -> Tensor:
        name = op["name"]
        _check_int32(acc, f"accumulator of '{op['module']}'")
        mult, shift = (_channels(self.t[f"{name}.{k}"], acc.dim()) for k in ("mult", "shift"))
        out = shift_round(acc, mult, shift) + _channels(self.t[f"{name}.bias"], acc.dim())
        return _check_int32(out, f"output of '{op['module']}'")

    def _qconv2d(self, op: dict, x: Tensor) -> Tensor:
        xi, w = self._layer_input(op, x), self.t[f"{op['name']}.weight"]
        dtype = _exact_dtype(xi, w)
        acc = F.conv2d(xi.to(dtype), w.to(dtype), None, op["stride"], op["padding"], op["dilation"], op["groups"])
        return self._requant(op, torch.round(acc).long())

    def _qlinear(self, op: dict, x: Tensor) -> Tensor:
        xi, w = self._layer_input(op, x), self.t[f"{op['name']}.weight"]
        dtype = _exact_dtype(xi, w)
        return self._requant(op, torch.round(F.linear(xi.to(dtype), w.to(dtype))).long())

    def _relu(self, op: dict, x: Tensor) -> Tensor:
        return x.clamp_min(0)

    def _relu6(self, op: dict, x: Tensor) -> Tensor:
        return x.clamp(0, 6 * 2**FRAC_BITS)

    def _add(self, op: dict, a: Tensor, b: Tensor) -> Tensor:
        return _check_int32(a + b, "a residual sum")

    def _slice(self, op: dict, x: Tensor) -> Tensor:
        index = tuple(Ellipsis if s == "..." else slice(*s) for s in op["index"])
        return x[index]

    def _pad(self, op: dict, x: Tensor) -> Tensor:
        return F.pad(x, op["pad"])

    def _mean_hw(self, op: dict, x: Tensor) -> Tensor:
        n = x.shape[2] * x.shape[3]
        return torch.div(2 * x.sum(dim=(2, 3), keepdim=True) + n, 2 * n, rounding_mode="floor")

    def _maxpool(self, op: dict, x: Tensor) -> Tensor:
        return F.max_pool2d(x.double(), op["kernel"], op["stride"], op["padding"]).long()

    def _flatten(self, op: dict, x: Tensor) -> Tensor:
        return torch.flatten(x, op["start_dim"])

    def _output(self, op: dict, x: Tensor) -> Tensor:
        return x.double() / 2**FRAC_BITS
