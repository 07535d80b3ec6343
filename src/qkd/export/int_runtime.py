"""The integer runtime: runs an integer program (:mod:`qkd.export.program`) on the CPU.

Activations entering a layer are its low-bit integers; weights are low-bit integers; accumulation
is exact integer arithmetic checked to stay within int32; requantization between layers is an
integer multiply (int32 mantissa, exact 64-bit product) and a rounding right shift, or, into a
layer's few input levels, a comparison with integer thresholds. Convolutions run as float
convolutions of integer values, exact by construction (see ``_exact_dtype``), so the results are
those of integer hardware.

Between layers the values are int64 fixed point (``value * 2**FRAC_BITS``) and every op but two is
integer-only, each with at most one rounding (half up):

- exact (no rounding): ReLU, ReLU6, residual sums, sums with a constant (the constant held in the
  fixed point), concatenation, chunk/split/slice, zero pads, reshapes and permutations (channel
  shuffle), flatten, max pooling;
- integer, rounded once: Hardsigmoid ``relu6(x + 3) / 6``, Hardswish ``x * relu6(x + 3) / 6`` and the
  product of two activations (the squeeze-excitation gate ``scale * x``) as exact 64 x 64-bit products
  (``mul_round``); a BatchNorm that follows no layer and a product with a constant as int32 mantissa
  and shift; average, adaptive-average and global-average pooling as exact window sums divided by the
  window size.
- **float64**: Sigmoid and SiLU. The fixed-point value is converted to float64, the function computed
  with PyTorch's float64 ``sigmoid`` and the result rounded back to the fixed point (2**-32), so they
  are exact to float64 rounding, as the ONNX integer form computes them too, but not integer-only.

The network's logits are read as float64 (``value / 2**FRAC_BITS``); float32 appears only in
quantizing the network's input, with the first layer's own float32 maths.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from qkd.errors import QKDError
from qkd.export.fixedpoint import INT32, INT64_SAFE, ONE, mul_round, shift_round, thresholds
from qkd.export.program import LAYERS, OPS, TERMS, pool_windows


def _check_range(t: Tensor, bound: int, what: str) -> Tensor:
    if t.numel() and ((mm := torch.aminmax(t))[1] >= bound or mm[0] < -bound):
        raise QKDError(f"{what} overflows {'int32' if bound == INT32 else 'the int64 fixed point'}")
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


class IntRuntime:
    """Callable integer network: ``IntRuntime(ops, tensors)(x) -> logits`` (float, for reading only).

    >>> runtime = IntRuntime(*to_int_program(student))
    >>> logits = runtime(images)

    An int file (``qkd export --format int``) is read with ``qkd.export.load_int(path)``, which returns
    its runtime and manifest. Each op of :data:`~qkd.export.program.OPS` is a method ``_<op>``.
    """

    def __init__(self, ops: list[dict], tensors: dict[str, Tensor]) -> None:
        self.ops = ops
        self.tensors = {k: v.long() if not v.is_floating_point() else v for k, v in tensors.items()}
        self.thresholds = {}
        self.last_use = {name: i for i, op in enumerate(ops) for name in op["in"]}
        for op in ops:
            if op["op"] not in OPS:
                raise QKDError(f"integer program op '{op['op']}' ({op['name']}) is unknown to this qkd")
            if op["op"] in LAYERS:
                mult, shift = (int(self.tensors[f"{op['name']}.{k}"]) for k in ("in_mult", "in_shift"))
                self.thresholds[op["name"]] = torch.tensor(thresholds(mult, shift, *op["a_range"]))

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        env: dict[str, Tensor] = {}
        for i, op in enumerate(self.ops):
            args = [env[name] for name in op["in"]] if op["op"] != "input" else [x]
            env[op["name"]] = getattr(self, "_" + op["op"])(op, *args)
            if op["op"] == "output":
                return env[op["name"]]
            for name in op["in"]:  # int64 activations are large: keep a value only until its last reader
                if self.last_use[name] == i:
                    del env[name]
        raise QKDError("integer program has no output op")

    def _layer_input(self, op: dict, x: Tensor) -> Tensor:
        lo, hi = op["a_range"]
        if x.is_floating_point():  # the network's input: quantized exactly as the fake-quant model does
            if "a_interval" in op:  # the interval kernel's float32 maths (see qkd.quant.ste)
                lower, upper = (torch.tensor(v, dtype=x.dtype) for v in op["a_interval"])
                width = (upper - lower).clamp_min(1e-8)
                z = (torch.minimum(torch.maximum(x, lower), upper) - lower) / width * hi
                return torch.round(z).long()
            return torch.clamp(torch.round(x / op["a_scale"]), lo, hi).long()
        # == clamp(shift_round(x - in_offset, in_mult, in_shift), lo, hi), by thresholds (see ``thresholds``)
        offset = self.tensors.get(f"{op['name']}.in_offset")
        return lo + torch.bucketize(x if offset is None else x - offset, self.thresholds[op["name"]], right=True)

    def _term(self, op: dict, key: str, acc: Tensor) -> Tensor:
        """One integer term of the layer's output times its multiplier, in fixed point (offset terms carry
        a second mantissa for the multiplier's remainder: ``mult * 2**-shift + mult_lo * 2**-shift_lo``)."""
        _check_range(acc, INT32, f"accumulator of '{op['module']}'")
        out = None
        for suffix in [f"_{key}", f"_{key}_lo"] if key else [""]:
            mult, shift = (_channels(self.tensors[f"{op['name']}.{k}{suffix}"], acc.dim()) for k in ("mult", "shift"))
            if bool((shift >= 1).all()):  # int32 accumulator times int32 mantissa: the product fits int64
                part = torch.bitwise_right_shift(
                    acc * mult + torch.bitwise_left_shift(torch.ones_like(shift), shift - 1), shift
                )
            else:
                part = shift_round(acc, mult, shift)
            out = part if out is None else out + part
        return out

    def _layer(self, op: dict, x: Tensor, linear) -> Tensor:
        """``linear(input, weight)`` for each term the layer has (see ``program.TERMS``), requantized and summed."""
        name = op["name"]
        xi, w = self._layer_input(op, x), self.tensors[f"{name}.weight"]
        # what each term convolves; built only for the terms the layer has (LSQ layers: the first one)
        operands = {
            "": lambda: (xi, w),
            "xsum": lambda: (xi, torch.ones_like(w)),
            "wsum": lambda: (torch.ones_like(xi[:1]), w),  # ones on the unpadded positions
            "count": lambda: (torch.ones_like(xi[:1]), torch.ones_like(w)),
        }
        out = None
        for key in TERMS:
            if f"{name}.mult{'_' + key if key else ''}" not in self.tensors:
                continue
            a, b = operands[key]()
            dtype = _exact_dtype(a, b)
            term = self._term(op, key, torch.round(linear(a.to(dtype), b.to(dtype))).long())
            out = term if out is None else out + term
        out = out + _channels(self.tensors[f"{name}.bias"], out.dim())
        return _check_range(out, INT64_SAFE, f"output of '{op['module']}'")

    def _qconv2d(self, op: dict, x: Tensor) -> Tensor:
        def conv(a: Tensor, w: Tensor) -> Tensor:
            return F.conv2d(a, w, None, op["stride"], op["padding"], op["dilation"], op["groups"])

        return self._layer(op, x, conv)

    def _qlinear(self, op: dict, x: Tensor) -> Tensor:
        return self._layer(op, x, F.linear)

    # ----- exact ops --------------------------------------------------------------------------------
    def _input(self, op: dict, x: Tensor) -> Tensor:
        return x

    def _relu(self, op: dict, x: Tensor) -> Tensor:
        return x.clamp_min(0)

    def _relu6(self, op: dict, x: Tensor) -> Tensor:
        return x.clamp(0, 6 * ONE)

    def _add(self, op: dict, a: Tensor, b: Tensor) -> Tensor:
        return _check_range(a + b, INT64_SAFE, "a residual sum")

    def _add_const(self, op: dict, x: Tensor) -> Tensor:
        return _check_range(x + round(op["value"] * ONE), INT64_SAFE, f"'{op['name']}'")

    def _slice(self, op: dict, x: Tensor) -> Tensor:
        index = tuple(Ellipsis if s == "..." else slice(*s) for s in op["index"])
        return x[index]

    def _chunk(self, op: dict, x: Tensor) -> Tensor:
        return torch.chunk(x, op["chunks"], op["dim"])[op["index"]]

    def _cat(self, op: dict, *xs: Tensor) -> Tensor:
        return torch.cat(xs, op["dim"])

    def _pad(self, op: dict, x: Tensor) -> Tensor:
        return F.pad(x, op["pad"])

    def _reshape(self, op: dict, x: Tensor) -> Tensor:
        return x.reshape(op["shape"])

    def _permute(self, op: dict, x: Tensor) -> Tensor:
        return x.permute(op["perm"])

    def _flatten(self, op: dict, x: Tensor) -> Tensor:
        return torch.flatten(x, op["start_dim"])

    def _maxpool(self, op: dict, x: Tensor) -> Tensor:  # int64 max pooling: a selection, exact
        return F.max_pool2d(x, op["kernel"], op["stride"] or op["kernel"], op["padding"], op.get("dilation", 1),
                            op.get("ceil_mode", False))  # fmt: skip

    # ----- integer, rounded once ------------------------------------------------------------------
    def _hardsigmoid(self, op: dict, x: Tensor) -> Tensor:
        r = (x + 3 * ONE).clamp(0, 6 * ONE)
        return torch.div(2 * r + 6, 12, rounding_mode="floor")

    def _hardswish(self, op: dict, x: Tensor) -> Tensor:
        # x for x >= 3, 0 for x <= -3; between them x * (x + 3) / 6 with one rounding
        inner = x.clamp(-3 * ONE, 3 * ONE)
        out = mul_round(inner, inner + 3 * ONE, 6)
        return torch.where(x >= 3 * ONE, x, out)

    def _mul(self, op: dict, a: Tensor, b: Tensor) -> Tensor:
        if a.numel() and b.numel() and int(a.abs().max()) * int(b.abs().max()) >= INT64_SAFE * ONE:
            raise QKDError(f"the product '{op['name']}' overflows the int64 fixed point")
        return mul_round(a, b)

    def _scale(self, op: dict, x: Tensor) -> Tensor:
        return shift_round(x, torch.tensor(op["mult"]), torch.tensor(op["shift"]))

    def _affine(self, op: dict, x: Tensor) -> Tensor:
        mult, shift, bias = (_channels(self.tensors[f"{op['name']}.{k}"], x.dim()) for k in ("mult", "shift", "bias"))
        return _check_range(shift_round(x, mult, shift) + bias, INT64_SAFE, f"BatchNorm '{op['module']}'")

    def _mean_hw(self, op: dict, x: Tensor) -> Tensor:
        n = x.shape[2] * x.shape[3]
        out = torch.div(2 * x.sum(dim=(2, 3), keepdim=True) + n, 2 * n, rounding_mode="floor")
        return out if op.get("keepdim", True) else out.flatten(1)

    def _pool(self, op: dict, x: Tensor) -> Tensor:
        """Window sums as ``rows @ x @ cols.T`` over 0/1 matrices (exact in int64), divided by the window sizes."""
        (rows, n_rows), (cols, n_cols) = (pool_windows(op, x.shape[d], i) for i, d in enumerate((-2, -1)))
        if x.numel() and int(x.abs().max()) * int(rows.sum(1).max()) * int(cols.sum(1).max()) >= INT64_SAFE // 2:
            raise QKDError(f"the pooling '{op['name']}' overflows the int64 fixed point")
        total = rows @ x @ cols.T
        n = n_rows[:, None] * n_cols[None, :]
        return torch.div(2 * total + n, 2 * n, rounding_mode="floor")

    _avgpool = _adaptive_avgpool = _pool

    # ----- float64 ----------------------------------------------------------------------------------
    def _sigmoid(self, op: dict, x: Tensor) -> Tensor:
        return torch.round(torch.sigmoid(x.double() / ONE) * ONE).long()

    def _silu(self, op: dict, x: Tensor) -> Tensor:
        v = x.double() / ONE
        return torch.round(v * torch.sigmoid(v) * ONE).long()

    def _output(self, op: dict, x: Tensor) -> Tensor:
        return x.double() / ONE


IntEngine = IntRuntime  # the old name, kept for old imports
