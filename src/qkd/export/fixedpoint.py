"""Fixed-point arithmetic of the integer program: multipliers as (int32 mantissa, shift), exact rounding products.

Pure functions on int64 tensors, each held against Python's unbounded integers by the tests
(gemmlowp / TFLite style multipliers; one rounding, half up). :func:`layer_to_fixed_point` and
:func:`affine_to_fixed_point` turn a traced program's float64 scales and biases into them.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor

from qkd.errors import QKDError
from qkd.export.program import FRAC_BITS

INT32 = 2**31
INT64_SAFE = 2**62  # headroom below int64 for the sums between layers
ONE = 2**FRAC_BITS  # 1.0 in the fixed point
_LOW = 2**32 - 1


def fixed_multiplier(m: Tensor, what: str = "a requantization multiplier") -> tuple[Tensor, Tensor]:
    """Real multipliers as (int32 mantissa, right shift): ``x * m ~= round(x * m0 / 2**s)`` (a left shift if s < 0)."""
    m = m.double()
    exp = torch.where(m != 0, torch.ceil(torch.log2(m.abs().clamp_min(1e-300))), torch.zeros_like(m))
    m0 = torch.round(m / torch.pow(2.0, exp) * 2**31)
    full = m0.abs() == 2**31  # mantissa rounded up to 1.0
    m0, exp = torch.where(full, m0 / 2, m0), torch.where(full, exp + 1, exp)
    shift = 31 - exp
    if (shift < -30).any() or (shift > 93).any():
        big = float(m.abs().max())
        raise QKDError(f"{what} ({big:.3g}) is outside the int32 fixed-point range; activations this far from "
                       "1 (often a network whose BatchNorm statistics were never set) do not fit the integer "
                       "engine's int64 fixed point")  # fmt: skip
    return m0.long(), shift.long()


def shift_round(v: Tensor, mult: Tensor, shift: Tensor) -> Tensor:
    """``round(v * mult / 2**shift)`` (round half up) for int64 ``v``, int32 ``mult``, ``-30 <= shift <= 93``.

    Exact without a 128-bit product: with ``v = hi * 2**31 + lo`` and ``0 <= lo < 2**31``,
    ``v * mult = high * 2**31 + low`` where ``high = hi * mult + (lo * mult >> 31)`` and
    ``low = lo * mult mod 2**31``; every term stays within int64 for ``|v| < 2**62``.
    """
    hi, lo = torch.bitwise_right_shift(v, 31), torch.bitwise_and(v, INT32 - 1)
    prod_lo = lo * mult
    high = hi * mult + torch.bitwise_right_shift(prod_lo, 31)
    low = torch.bitwise_and(prod_lo, INT32 - 1)
    one = torch.ones_like(shift)
    # shift >= 32: the rounding half 2**(shift-1) lands in ``high``, and ``low`` cannot carry into it
    big = torch.bitwise_right_shift(high + torch.bitwise_left_shift(one, (shift - 32).clamp_min(0)),
                                    (shift - 31).clamp(0, 63))  # fmt: skip
    # 1 <= shift <= 31: high * 2**31 is a multiple of 2**shift; shift <= 0: a plain left shift
    mid = shift.clamp(1, 31)
    low = torch.where(shift >= 1, torch.bitwise_right_shift(low + torch.bitwise_left_shift(one, mid - 1), mid),
                      torch.bitwise_left_shift(low, (-shift).clamp(0, 62)))  # fmt: skip
    small = torch.bitwise_left_shift(high, (31 - shift).clamp(0, 62)) + low
    return torch.where(shift >= 32, big, small)


def mul_round(a: Tensor, b: Tensor, div: int = 1) -> Tensor:
    """``round(a * b / (div * 2**32))`` (round half up) for int64 ``a``, ``b`` and a small ``div > 0``, exactly.

    The 128-bit product is kept as ``high * 2**32 + low`` with ``0 <= low < 2**32``: with
    ``a = ah * 2**32 + al`` (the same for ``b``) and ``al = alh * 2**16 + all``,
    ``a * b = (ah bh 2**32 + ah bl + al bh) 2**32 + al bl`` and ``al bl = alh bl 2**16 + all bl``, each
    partial product within int64 while ``|a|, |b| < 2**62`` and ``|a * b| / 2**32 < 2**62``.
    """
    ah, al = torch.bitwise_right_shift(a, 32), torch.bitwise_and(a, _LOW)
    bh, bl = torch.bitwise_right_shift(b, 32), torch.bitwise_and(b, _LOW)
    alh, all_ = torch.bitwise_right_shift(al, 16), torch.bitwise_and(al, 2**16 - 1)
    t = alh * bl  # < 2**48
    low = torch.bitwise_left_shift(torch.bitwise_and(t, 2**16 - 1), 16) + all_ * bl  # < 2**49
    high = torch.bitwise_left_shift(ah * bh, 32) + ah * bl + al * bh + torch.bitwise_right_shift(t, 16)
    high, low = high + torch.bitwise_right_shift(low, 32), torch.bitwise_and(low, _LOW)
    q = torch.div(high, div, rounding_mode="floor")
    rest = (high - q * div) * 2**32 + low  # the remainder, below div * 2**32
    return q + torch.div(2 * rest + div * 2**32, 2 * div * 2**32, rounding_mode="floor")


def thresholds(mult: int, shift: int, lo: int, hi: int) -> list[int]:
    """Integer thresholds ``t_k`` with ``clamp(shift_round(v, mult, shift), lo, hi) == lo + #{k: v >= t_k}``.

    ``round_half_up(v * mult / 2**shift) >= k``  <=>  ``2 * v * mult >= (2k - 1) * 2**shift``; for
    ``mult > 0`` that is ``v >= ceil((2k - 1) * 2**shift / (2 * mult))``, computed exactly in Python
    integers. Requantizing to a few levels is then one sorted search per value (threshold
    activation units in low-bit accelerators do the same).
    """
    if mult <= 0:
        raise QKDError("an activation requantization multiplier must be positive")
    scale = Fraction(2**shift) if shift >= 0 else Fraction(1, 2**-shift)  # exact rationals, no float
    return [math.ceil((2 * k - 1) * scale / (2 * mult)) for k in range(lo + 1, hi + 1)]


def layer_to_fixed_point(op: dict, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A traced layer's float64 scales and bias as the integer requantization the runtime uses."""
    what = f"the requantization multiplier of layer '{op['module']}'"
    out = {"weight": tensors["weight"], "bias": torch.round(tensors["bias"] * 2**FRAC_BITS).long()}
    for key, scale in tensors.items():
        if key.startswith("scale"):
            term = key[len("scale") :]
            out[f"mult{term}"], out[f"shift{term}"] = m0, shift = fixed_multiplier(scale * 2**FRAC_BITS, what)
            if term:  # offset terms are large and cancel one another: a second mantissa for the remainder
                rest = scale * 2**FRAC_BITS - m0.double() * torch.pow(2.0, -shift.double())
                out[f"mult{term}_lo"], out[f"shift{term}_lo"] = fixed_multiplier(rest, what)
    in_scale = torch.tensor([2.0**-FRAC_BITS / op["a_scale"]], dtype=torch.float64)
    out["in_mult"], out["in_shift"] = fixed_multiplier(in_scale, f"the input requantization of layer '{op['module']}'")
    out["in_offset"] = torch.tensor([round(op["a_offset"] * 2**FRAC_BITS)], dtype=torch.long)
    return out


def affine_to_fixed_point(op: dict, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A per-channel ``x * scale + bias`` between fixed-point values: int32 mantissa and shift, fixed-point bias."""
    mult, shift = fixed_multiplier(tensors["scale"], f"the multiplier of BatchNorm '{op['module']}'")
    return {"mult": mult, "shift": shift, "bias": torch.round(tensors["bias"] * 2**FRAC_BITS).long()}
