"""A data loader for data sets that fit in (device) memory as one uint8 tensor.

Why not ``torch.utils.data.DataLoader``: for CIFAR-sized data its per-image Python work (indexing, PIL
transforms, collation) costs far more than a small network's forward pass. Here the whole set lives on the
training device once; a batch is a slice or a gather, augmentation is a few tensor ops on the whole batch,
and normalisation happens in float only for the batch in flight.

Under torchrun (``shard=(rank, world)``) each rank takes every world-th image of each global batch: the
ranks' shares are disjoint, a pass has the same number of batches on every rank, and the global batch is
``batch_size``. Training drops the last ``< world`` images of a pass so that every rank gets as many;
evaluation keeps them all (a rank may get fewer, even none, in the last batch).

Reproducibility: the shuffle order and every augmentation draw of one pass come from a ``torch.Generator``
seeded with that pass's seed (see :meth:`TensorLoader.set_epoch`), drawn on the CPU and then moved, so the
same seed gives the same batches on CPU and CUDA and a resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from qkd.data.augment import crop_at, crop_offsets, flip_mask, flip_where, normalize_affine
from qkd.distributed import local_batch

__all__ = ["TensorLoader"]

Batch = tuple[Tensor, Tensor]


class TensorLoader:
    """Yields ``(x, y)`` batches on ``device``: ``x`` float32 NCHW normalised, ``y`` int64."""

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        *,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        augment: bool = False,
        crop_padding: int = 4,
        flip: bool = True,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
        device: str | torch.device = "cpu",
        seed: int = 0,
        shard: tuple[int, int] = (0, 1),
        per_pass: int | None = None,
    ) -> None:
        _check_tensors(x, y, batch_size, len(mean))
        if per_pass is not None and not shuffle:
            raise ValueError("per_pass draws a fresh subset each pass: it needs shuffle=True")
        self.rank, self.world = shard
        if shuffle:
            local_batch(batch_size, self.world)  # the global batch must split evenly
        self.device = torch.device(device)
        self.images = x.to(self.device)
        self.labels = y.to(self.device, torch.int64)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.crop_padding = max(0, int(crop_padding))
        self.flip = flip
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._scale, self._shift = normalize_affine(self.mean, self.std, self.device)
        self._seed = int(seed)
        self.per_pass = per_pass

    @property
    def num_samples(self) -> int:
        """Images in the data set (not batches; ``len(loader)`` is the number of batches)."""
        return int(self.labels.shape[0])

    @property
    def pass_samples(self) -> int:
        """Images in one pass: ``per_pass`` drawn afresh from the data set each pass, else all of them."""
        return self.num_samples if self.per_pass is None else min(self.per_pass, self.num_samples)

    def __len__(self) -> int:
        full, rest = divmod(self.pass_samples, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def set_epoch(self, seed: int) -> None:
        """Fix the seed of the next pass; order and augmentation are a pure function of it.

        Without a call, each pass uses the previous pass's seed + 1, so a plain ``for`` over epochs still
        reshuffles; a trainer that resumes calls this with the epoch's seed to replay the same batches.
        """
        self._seed = int(seed)

    def __iter__(self) -> Iterator[Batch]:
        # Not a generator function: the seed must be taken when iter() is called, not at the first next().
        seed, self._seed = self._seed, self._seed + 1
        return self._batches(seed)

    def _batches(self, seed: int) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(seed)
        n = self.pass_samples
        order = torch.randperm(self.num_samples, generator=gen)[:n].to(self.device) if self.shuffle else None
        draws = self._draw_augmentation(n, gen)
        stop = min(len(self) * self.batch_size, n)
        if self.world > 1 and self.shuffle:  # training: every rank gets as many images (the rest is dropped)
            stop -= stop % self.world
        for start in range(0, stop, self.batch_size):
            end = min(start + self.batch_size, stop)
            # one process: a slice; under torchrun: this rank's share of the global batch (every world-th)
            at = slice(start, end)
            if self.world > 1:
                at = torch.arange(start + self.rank, end, self.world, device=self.device)
            idx = at if order is None else order[at]
            yield self._finish(self.images[idx], draws, at), self.labels[idx]

    def _draw_augmentation(self, n: int, gen: torch.Generator) -> dict[str, Tensor]:
        """Draw the whole pass's crop corners and flip choices at once and move them in one copy."""
        draws: dict[str, Tensor] = {}
        if not self.augment:
            return draws
        if self.crop_padding > 0:
            dy, dx = crop_offsets(n, self.crop_padding, gen)
            draws["dy"], draws["dx"] = dy.to(self.device), dx.to(self.device)
        if self.flip:
            draws["flip"] = flip_mask(n, gen).to(self.device)
        return draws

    def _finish(self, x: Tensor, draws: dict[str, Tensor], at: slice | Tensor) -> Tensor:
        """Augment in uint8 (4x fewer bytes to move), then normalise to float32."""
        if "dy" in draws:
            x = crop_at(x, self.crop_padding, draws["dy"][at], draws["dx"][at])
        if "flip" in draws:
            x = flip_where(x, draws["flip"][at])
        return torch.mul(x, self._scale).sub_(self._shift)

    def __repr__(self) -> str:
        return (
            f"TensorLoader(num_samples={self.num_samples}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, augment={self.augment}, device={self.device})"
        )


def _check_tensors(x: Tensor, y: Tensor, batch_size: int, channels: int) -> None:
    """Reject inputs that would otherwise fail later inside a training step with an obscure message."""
    if x.dim() != 4:
        raise ValueError(f"x must be NCHW (4 dims), got shape {tuple(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if channels != x.shape[1]:
        raise ValueError(f"mean/std have {channels} channels but x has {x.shape[1]}")
