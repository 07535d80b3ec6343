"""Splits of a source: the validation split carved out of the training split (or the test split, with
``val_from=test``), stratified and seeded; stratified limits; and the normalisation statistics.

Every split is deterministic: the test split is fixed by the source, the validation split comes from ``seed``,
so results are comparable across runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from qkd.data.options import SourceOptions
from qkd.errors import QKDError

VAL_FROM_TEST_SEED = 0  # val_from=test: the same validation images for every run seed


def split_val(y: np.ndarray, val_size: int | float, seed: int, split: str = "training") -> tuple[np.ndarray, ...]:
    """Indices (rest, val) of a split: val is a seeded, stratified ``val_size`` of it."""
    n = len(y)
    n_val = math.ceil(val_size * n) if isinstance(val_size, float) and val_size < 1 else int(val_size)
    if not 1 <= n_val < n:
        raise QKDError(f"data.val_size={val_size} leaves no {split} images: the {split} split has {n}")
    val, rest = _stratified_pick(y, n_val, seed)
    return rest, val


def three_splits(train_y: np.ndarray, test_y: np.ndarray, o: SourceOptions) -> dict[str, tuple[str, np.ndarray]]:
    """Each split's source (``train`` or ``test`` arrays/folders) and indices, after ``val_from`` and limits."""
    if o.val_from == "test":
        test_idx, val_idx = split_val(test_y, o.val_size, VAL_FROM_TEST_SEED, "test")
        splits = {"train": ("train", np.arange(len(train_y))), "val": ("test", val_idx), "test": ("test", test_idx)}
    else:
        train_idx, val_idx = split_val(train_y, o.val_size, o.seed)
        splits = {"train": ("train", train_idx), "val": ("train", val_idx), "test": ("test", np.arange(len(test_y)))}
    labels = {"train": train_y, "test": test_y}
    return {name: (src, _limit(idx, labels[src], o.train_cap if name == "train" else o.limit, o.seed))
            for name, (src, idx) in splits.items()}  # fmt: skip


def _limit(idx: np.ndarray, y: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """At most ``limit`` of ``idx`` (indices into ``y``), a stratified seeded subsample in original order."""
    if limit is None or len(idx) <= limit:
        return idx
    picked, _ = _stratified_pick(y[idx], limit, seed)
    return idx[picked]


def _stratified_pick(y: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted positions (picked, rest) with ``len(picked) == k``, class-balanced when classes allow."""
    from sklearn.model_selection import train_test_split

    positions = np.arange(len(y))
    try:
        rest, picked = train_test_split(positions, test_size=k, stratify=y, random_state=seed)
    except ValueError:  # a class too rare to stratify (or k < number of classes): plain seeded sample
        rest, picked = train_test_split(positions, test_size=k, random_state=seed)
    return np.sort(picked), np.sort(rest)


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of ``x/255`` (NHWC uint8), rounded to 4 decimals.

    Computed from a 256-bin histogram per channel: exact, and no float copy of a 150 MB array.
    """
    levels = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[-1]):
        counts = np.bincount(x[..., c].ravel(), minlength=256).astype(np.float64)
        p = counts / counts.sum()
        m = float((p * levels).sum())
        s = math.sqrt(float((p * (levels - m) ** 2).sum()))
        means.append(round(m, 4))
        stds.append(round(s, 4) if round(s, 4) > 0 else 1.0)  # constant images: leave the scale alone
    return tuple(means), tuple(stds)


def resolve_stats(
    o: SourceOptions, default_mean: Sequence[float], default_std: Sequence[float], channels: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Explicit mean/std win over the source's defaults; both must have one value per channel."""
    mean = tuple(float(v) for v in (o.mean if o.mean is not None else default_mean))
    std = tuple(float(v) for v in (o.std if o.std is not None else default_std))
    for label, values in (("mean", mean), ("std", std)):
        if len(values) != channels:
            raise QKDError(f"data.{label} has {len(values)} values but the images have {channels} channels")
    if min(std) <= 0:
        raise QKDError(f"data.std values must be > 0, got {std}")
    return mean, std
