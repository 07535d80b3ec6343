"""Data sources by name behind one function, :func:`build_data`: the registry.

Small sources (digits, CIFAR, ``.npz`` arrays: :mod:`~qkd.data.arrays`) are loaded as uint8 arrays and served
from device memory; large image folders (:mod:`~qkd.data.stream`) are streamed from disk; ``pkg.module:function``
names a user factory (:mod:`~qkd.data.factory`). Splits and statistics are shared (:mod:`~qkd.data.splits`).
"""

from __future__ import annotations

from dataclasses import fields

import torch

from qkd.data.arrays import ARRAY_SOURCES, NO_FILES, Arrays, bundle_from_arrays
from qkd.data.factory import from_factory
from qkd.data.options import DataBundle, DataOptions, SourceOptions
from qkd.data.stream import IMAGENET_MEAN, IMAGENET_STD, STREAM_SOURCES, StreamLoader
from qkd.distributed import resolve_device
from qkd.errors import QKDError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Arrays", "DataBundle", "StreamLoader", "build_data", "list_datasets"]


def list_datasets() -> list[str]:
    """Names accepted by :func:`build_data`."""
    return sorted([*ARRAY_SOURCES, *STREAM_SOURCES])


def build_data(
    options: DataOptions | str, root: str | None = None, *, device: str | torch.device = "cpu", seed: int = 0, **kw
) -> DataBundle:
    """Build train/val/test loaders from :class:`DataOptions` (or a name, ``root`` and its fields as keywords).

    ``val_size`` (a fraction < 1, or a count) is carved out of the training split, stratified and seeded;
    ``limit`` keeps a stratified, seeded subsample of at most that many images per split (quick runs);
    ``train_limit`` does so for the training split alone (short studies that still report on the full test);
    explicit ``mean``/``std`` override the source's defaults (e.g. the ImageNet statistics that the
    pretrained CIFAR ResNets expect). User mistakes raise :class:`QKDError`.

    >>> bundle = build_data("digits", batch_size=64)
    """
    try:
        opts = DataOptions(name=options, root=root, **kw) if isinstance(options, str) else options
    except (TypeError, ValueError) as e:
        raise QKDError(str(e)) from None
    key = opts.name.strip().lower()
    if opts.epoch_images is not None and (":" in key or key in STREAM_SOURCES):
        raise QKDError(f"data.epoch_images applies to the in-memory sources ({', '.join(ARRAY_SOURCES)}), not to "
                       f"{opts.name}; drop it, or use data.train_limit for a fixed subset")  # fmt: skip
    if ":" in key:
        return from_factory(opts, _device(device), seed)
    if key not in ARRAY_SOURCES and key not in STREAM_SOURCES:
        valid = ", ".join(list_datasets())
        raise QKDError(f"unknown data set '{opts.name}'; valid data sets: {valid}, or pkg.module:function")
    if key in NO_FILES and opts.root is not None:
        raise QKDError(f"{key} is built in and reads no files; drop data.root (given: {opts.root}; "
                       "`data.root=` clears the one a preset sets)")  # fmt: skip
    if opts.decode != "pil" and key not in STREAM_SOURCES:
        raise QKDError(f"{key} is decoded once, into memory; data.decode={opts.decode} applies to imagefolder only, "
                       "drop it")  # fmt: skip
    o = SourceOptions(**{f.name: getattr(opts, f.name) for f in fields(DataOptions)}, device=_device(device), seed=seed)
    if key in STREAM_SOURCES:
        return STREAM_SOURCES[key](o.root, o)
    return bundle_from_arrays(ARRAY_SOURCES[key](o.root, o.download), o)


def _device(device: str | torch.device) -> torch.device:
    return resolve_device(str(device))
