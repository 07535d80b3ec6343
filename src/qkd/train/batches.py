"""Batches for the trainer: any replayable source of ``(x, y)``, every epoch's randomness from (seed, stage, epoch).

The global torch seed is set before each epoch (a ``DataLoader``'s shuffling and workers draw from it) and a
source with ``set_epoch`` gets that seed too, so that an interrupted run resumes bit-identical on the CPU.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DistributedSampler

from qkd.errors import QKDError

#: the seed slot (in place of a stage's index) of the batches that initialise the quantizers
CALIBRATION_STAGE = 999


def epoch_seed(seed: int, stage: int, epoch: int) -> int:
    """The seed of epoch ``epoch`` of stage ``stage`` in a run seeded ``seed``."""
    return (seed * 1_000_003 + stage * 10_007 + epoch) % (2**31)


class Batches:
    """A replayable source of ``(x, y)`` batches: an iterable (``DataLoader``, ``TensorLoader``, list)
    or a zero-argument factory returning one (a generator function). ``len`` is the batches per epoch:
    the source's own, or ``steps`` for sources without one.

    >>> batches = Batches(train_loader)
    >>> for x, y in batches.epoch(epoch_seed(0, stage=1, epoch=3)): ...
    """

    def __init__(self, source: Any, steps: int | None = None, what: str = "train") -> None:
        if source is None or not (callable(source) or isinstance(source, Iterable)):
            raise QKDError(f"{what} data must be an iterable of (x, y) batches or a function returning one")
        if isinstance(source, Iterator):
            raise QKDError(f"{what} data is a one-pass iterator (e.g. a generator); pass the function that makes it, "
                           "so that every epoch gets a fresh pass")  # fmt: skip
        sampler = getattr(source, "sampler", None)
        if what != "train" and isinstance(sampler, DistributedSampler) and sampler.drop_last:
            raise QKDError(
                f"{what} data: its DistributedSampler has drop_last=True, which leaves images out of "
                f"the {what} figures; give it drop_last=False (qkd counts a repeated image once)"
            )
        self.source, self.steps, self.what = source, steps, what

    def __len__(self) -> int:
        if self.steps is not None:
            return self.steps
        try:
            return len(self.source)
        except TypeError:
            raise QKDError(
                f"{self.what} data has no len(); pass steps_per_epoch=N (batches per epoch) for the schedules"
            ) from None

    def epoch(self, seed: int) -> Iterable:
        """The batches of one pass, with every random draw seeded from ``seed``: the global torch seed, and every
        sampler that takes an epoch (a ``DistributedSampler`` inside a ``DataLoader`` included)."""
        torch.manual_seed(seed)
        for sampler in epoch_takers(self.source):
            sampler.set_epoch(seed)
        return self

    def __iter__(self) -> Iterator:
        batches = self.source if isinstance(self.source, Iterable) else self.source()
        batches = itertools.islice(batches, self.steps) if self.steps is not None else batches
        return iter(batches if self.what == "train" else without_padding(batches, self.source))


def epoch_takers(source: Any) -> list:
    """What in ``source`` takes an epoch's seed: the source itself (a ``TensorLoader``), else a ``DataLoader``'s
    sampler and its batch sampler's sampler (a ``DistributedSampler`` given by the user), each once."""
    if hasattr(source, "set_epoch"):
        return [source]
    found = []
    for sampler in (getattr(source, "sampler", None), getattr(getattr(source, "batch_sampler", None), "sampler", None)):
        if hasattr(sampler, "set_epoch") and not any(sampler is f for f in found):
            found.append(sampler)
    return found


def without_padding(batches: Iterable, source: Any) -> Iterator:
    """``batches`` without the images a ``DistributedSampler`` repeats at the end so that every rank gets as many:
    an evaluation counts every image once."""
    sampler = getattr(source, "sampler", None)
    if not isinstance(sampler, DistributedSampler):
        yield from batches
        return
    left = len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))  # this rank's real images
    for batch in batches:
        x, y = batch[0], batch[1]
        if left < len(y):
            x, y = x[:left], y[:left]
        left -= len(y)
        yield x, y
