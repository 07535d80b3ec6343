"""Batches for the trainer: any replayable source of ``(x, y)``, every epoch's randomness from (seed, stage, epoch).

The global torch seed is set before each epoch (a ``DataLoader``'s shuffling and workers draw from it) and a
source with ``set_epoch`` gets that seed too, so that an interrupted run resumes bit-identical on the CPU.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch

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
        """The batches of one pass, with every random draw seeded from ``seed``."""
        torch.manual_seed(seed)
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(seed)
        return self

    def __iter__(self) -> Iterator:
        batches = self.source if isinstance(self.source, Iterable) else self.source()
        return iter(itertools.islice(batches, self.steps) if self.steps is not None else batches)
