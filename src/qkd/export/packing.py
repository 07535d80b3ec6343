"""Bit-packing of small integers: ``bits`` bits per value, no padding between values.

Two 4-bit or four 2-bit values share a byte; 3-, 5-, 6- and 7-bit values straddle bytes. Values are
stored offset-binary (``q - qmin``), so signed and unsigned codes pack the same way.
"""

from __future__ import annotations

import numpy as np


def pack_bits(values: np.ndarray, bits: int, qmin: int) -> np.ndarray:
    """Pack integer ``values`` (each in ``[qmin, qmin + 2**bits)``) into a uint8 array."""
    codes = np.asarray(values, dtype=np.int64).ravel() - qmin
    if codes.size and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(f"values outside the {bits}-bit range starting at {qmin}")
    # one row of `bits` binary digits per value, most significant first, then 8 digits per byte
    digits = (codes[:, None] >> np.arange(bits - 1, -1, -1)) & 1
    return np.packbits(digits.astype(np.uint8).ravel())


def unpack_bits(packed: np.ndarray, bits: int, qmin: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` int64 values."""
    digits = np.unpackbits(np.asarray(packed, dtype=np.uint8))[: count * bits].reshape(count, bits)
    codes = (digits.astype(np.int64) << np.arange(bits - 1, -1, -1)).sum(axis=1)
    return codes + qmin
