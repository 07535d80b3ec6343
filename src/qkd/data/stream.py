"""Streamed sources: image folders (ImageNet layout) read from disk through a ``torch.utils.data.DataLoader``
(:class:`StreamLoader`), decoded by PIL, or by :mod:`qkd.data.jpeg` on the CPU or the GPU (``data.decode``)."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qkd.data import jpeg
from qkd.data.options import DataBundle, SourceOptions
from qkd.data.splits import resolve_stats, three_splits
from qkd.distributed import local_batch, rank, world_size
from qkd.errors import QKDError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class StreamLoader:
    """A ``DataLoader`` that behaves like :class:`TensorLoader`: batches on ``device``, ``set_epoch``.

    Seeding the loader's generator per pass fixes the shuffle order and the worker seeds (hence the
    random transforms when ``num_workers > 0``; without workers they draw from a random state begun from the
    pass's seed), so streamed training also resumes reproducibly.
    ``collate_fn`` and ``finish`` (``finish(x, device)`` makes the batch of images from what the workers
    collated, in this process: ``data.decode=cuda``) change what travels from the workers.
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        *,
        batch_size: int,
        shuffle: bool,
        num_workers: int,
        device: torch.device,
        seed: int = 0,
        collate_fn: Callable | None = None,
        finish: Callable[[Any, torch.device], Tensor] | None = None,
    ) -> None:
        self.device = device
        self._finish = finish
        self._generator = torch.Generator()
        self._seed = int(seed)
        self._num_samples = len(dataset)  # type: ignore[arg-type]
        self._sampler = _shard_sampler(len(dataset), shuffle, seed)  # type: ignore[arg-type]
        if self._sampler is not None and shuffle:  # the global batch, split over the ranks
            batch_size = local_batch(batch_size, world_size())
        self._loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle and self._sampler is None,
            sampler=self._sampler,
            num_workers=num_workers,
            pin_memory=device.type == "cuda" and finish is None,  # finish's input is not the batch to copy
            generator=self._generator,
            collate_fn=collate_fn,
        )

    @property
    def num_samples(self) -> int:
        return self._num_samples

    def __len__(self) -> int:
        return len(self._loader)

    def set_epoch(self, seed: int) -> None:
        """Fix the seed of the next pass (default: previous seed + 1), as TensorLoader does."""
        self._seed = int(seed)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        seed, self._seed = self._seed, self._seed + 1
        self._generator.manual_seed(seed)
        if hasattr(self._sampler, "set_epoch"):
            self._sampler.set_epoch(seed)
        batches = iter(self._loader)
        return self._moved(batches if self._loader.num_workers else _drawn_apart(batches, seed))

    def _moved(self, batches: Iterator[tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in batches:
            if self._finish is not None:
                x = self._finish(x, self.device)
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def _drawn_apart(batches: Iterator, seed: int) -> Iterator:
    """The batches of a loader without workers, each made under a random state of its own, begun from the pass's
    ``seed`` and carried from batch to batch. The random transforms (crops, flips) draw from torch's generator,
    which training in this process draws from too, and which a resumed run has in another state: the crops would
    not follow the seed, and a resumed run would not repeat the uninterrupted one. (Workers seed theirs from the
    loader's generator, seeded with the pass's seed.)"""
    start = int(np.random.SeedSequence([seed, 1]).generate_state(1, np.uint64)[0])  # apart from the shuffle's seed
    state = torch.Generator().manual_seed(start).get_state()
    while True:
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(state)
            batch = next(batches, None)
            state = torch.get_rng_state()
        if batch is None:
            return
        yield batch


def _shard_sampler(n: int, shuffle: bool, seed: int) -> torch.utils.data.Sampler | None:
    """Under torchrun, this rank's images: for training a shuffled, equal share (``DistributedSampler``, the
    remainder dropped), for evaluation every world-th image (no image twice, none left out); else None."""
    if world_size() == 1:
        return None
    if shuffle:
        return torch.utils.data.DistributedSampler(
            range(n), num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed, drop_last=True
        )
    return list(range(rank(), n, world_size()))  # type: ignore[return-value]


def _build_imagefolder(root: str | None, o: SourceOptions) -> DataBundle:
    """ImageNet layout: ``root/train/<class>/*`` and ``root/val/<class>/*`` (the latter is the test split)."""
    from torchvision.datasets import ImageFolder

    base = _imagefolder_root(root)
    if o.decode == "cuda":
        _check_gpu_decode(o.device)
    mean, std = resolve_stats(o, IMAGENET_MEAN, IMAGENET_STD, 3)
    loader, train_tf, eval_tf = _imagefolder_pipeline(o.decode, mean, std, o.augment)
    try:
        train_set = ImageFolder(str(base / "train"), transform=train_tf, loader=loader)
        test_set = ImageFolder(str(base / "val"), transform=eval_tf, loader=loader)
    except (FileNotFoundError, OSError) as e:
        raise QKDError(f"cannot read the image folders under {base}: {e}") from e
    if test_set.classes != train_set.classes:
        raise QKDError(f"{base}/train and {base}/val must have the same class folders")
    val_view = copy.copy(train_set)  # same file list (no second scan), eval transform
    val_view.transform = eval_tf
    targets, test_targets = np.asarray(train_set.targets), np.asarray(test_set.targets)
    sets = {("train", True): train_set, ("train", False): val_view, ("test", False): test_set}
    finish = functools.partial(jpeg.finish_batch, mean=mean, std=std) if o.decode == "cuda" else None
    train, val, test = (_stream(sets[src, name == "train"], idx, name == "train", o, finish)
                        for name, (src, idx) in three_splits(targets, test_targets, o).items())  # fmt: skip
    return DataBundle(train, val, test, len(train_set.classes), 3, jpeg.SIZE, mean, std)


def _stream(
    dataset: torch.utils.data.Dataset, idx: np.ndarray, train: bool, o: SourceOptions, finish: Callable | None = None
) -> StreamLoader:
    return StreamLoader(
        torch.utils.data.Subset(dataset, idx.tolist()),
        batch_size=o.batch_size if train else o.eval_batch_size,
        shuffle=train,
        num_workers=o.num_workers,
        device=o.device,
        seed=o.seed,
        collate_fn=jpeg.collate if finish is not None else None,
        finish=finish,
    )


def _check_gpu_decode(device: torch.device) -> None:
    if device.type != "cuda":
        raise QKDError(f"data.decode=cuda decodes on the GPU but this run's device is {device}; use data.decode=cpu "
                       "(torchvision's decoders in the loader workers) or pil")  # fmt: skip


def _imagefolder_root(root: str | None) -> Path:
    if not root:
        raise QKDError("data set 'imagefolder' needs data.root: a folder with train/<class>/ and val/<class>/")
    base = Path(root).expanduser()
    missing = [str(base / sub) for sub in ("train", "val") if not (base / sub).is_dir()]
    if missing:
        raise QKDError(f"imagefolder data.root {base} lacks the folder(s): {', '.join(missing)}")
    return base


def imagefolder_transforms(mean: Sequence[float], std: Sequence[float], augment: bool) -> tuple:
    """The standard ImageNet recipe: random-resized crop + flip for training, resize + centre crop else."""
    from torchvision import transforms as T

    tail = [T.ToTensor(), T.Normalize(mean, std)]
    eval_tf = T.Compose([T.Resize(256), T.CenterCrop(224), *tail])
    train_tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), *tail]) if augment else eval_tf
    return train_tf, eval_tf


def _imagefolder_pipeline(decode: str, mean: Sequence[float], std: Sequence[float], augment: bool) -> tuple:
    """``(loader, train transform, eval transform)`` of ``ImageFolder`` for a ``data.decode`` mode: PIL and
    torchvision's transforms (``pil``), or :mod:`qkd.data.jpeg`'s tensor path (``cpu``; ``cuda`` prepares the
    items that :func:`~qkd.data.jpeg.finish_batch` makes the batch of on the GPU)."""
    from torchvision.datasets.folder import default_loader

    if decode == "pil":
        return default_loader, *imagefolder_transforms(mean, std, augment)
    if decode == "cpu":
        return jpeg.file_path, jpeg.DecodeHere(augment, mean, std), jpeg.DecodeHere(False, mean, std)
    return jpeg.file_path, jpeg.Prepare(augment), jpeg.Prepare(False)


STREAM_SOURCES: dict[str, Callable[[str | None, SourceOptions], DataBundle]] = {
    "imagefolder": _build_imagefolder,
}
