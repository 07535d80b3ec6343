"""Batches for the trainer: any replayable source of ``(x, y)``, every epoch's randomness from (seed, stage, epoch).

The global torch seed is set before each epoch (a ``DataLoader``'s shuffling and workers draw from it) and a
source with ``set_epoch`` gets that seed too, so that an interrupted run resumes bit-identical on the CPU.
A stage's seeds follow its name, not its place in the plan (:func:`stage_seed`): ``method=qat`` and
``method=qkd`` with one seed train the same float student, whether a float teacher stage comes first or not.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DistributedSampler

from qkd.errors import QKDError

#: how runs seed their stages (``seeding`` in summary.json and in every snapshot): from each stage's name
SEEDING = "stage-name"
#: runs begun before it (their snapshots say nothing): from each stage's index; resumed as they began
INDEX_SEEDING = "stage-index"
#: what a stage draws before its first epoch (model changes, the quantizers' calibration batch)
START = "start"
CALIBRATION = "calibration"


def stage_seed(seed: int, stage: str, draw: int | str, occurrence: int = 1) -> int:
    """The seed of ``draw`` (an epoch, or :data:`START`) of the stage named ``stage`` in a run seeded ``seed``: a
    stable hash of all four, the same whatever stages come before it. ``occurrence`` tells apart stages of one
    name in a plan (the second of two ``fp_student`` stages is 2)."""
    text = json.dumps([seed, stage, occurrence, draw])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % (2**31)


def index_seed(seed: int, index: int, draw: int | str) -> int | None:
    """The seed of ``draw`` of the stage at ``index`` as runs begun before :data:`SEEDING` drew it (None: that
    scheme did not reseed there), so that such a run resumes bit-identical to its uninterrupted twin."""
    if draw == START:
        return None
    index, epoch = (999, 0) if draw == CALIBRATION else (index, draw)
    return (seed * 1_000_003 + index * 10_007 + epoch) % (2**31)


def run_seed(scheme: str, seed: int, keys: list[str], i: int, draw: int | str) -> int | None:
    """The seed of ``draw`` of stage ``i`` (of a plan whose stage names are ``keys``) under ``scheme``. The
    quantizers' calibration batch is one per run, whichever stage quantizes: every method draws it alike."""
    if scheme == INDEX_SEEDING:
        return index_seed(seed, i, draw)
    if draw == CALIBRATION:
        return stage_seed(seed, "", CALIBRATION)
    return stage_seed(seed, keys[i], draw, keys[: i + 1].count(keys[i]))


class Batches:
    """A replayable source of ``(x, y)`` batches: an iterable (``DataLoader``, ``TensorLoader``, list)
    or a zero-argument factory returning one (a generator function). ``len`` is the batches per epoch:
    the source's own, or ``steps`` for sources without one.

    >>> batches = Batches(train_loader)
    >>> for x, y in batches.epoch(stage_seed(0, "1_self_study", draw=3)): ...
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
