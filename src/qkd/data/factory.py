"""Data from user code: ``data.name=mypkg.data:loaders`` names a function that returns the loaders.

The function is called with the data options it accepts (``root``, ``batch_size``, ``eval_batch_size``,
``val_size``, ``augment``, ``num_workers``, ``limit``, ``train_limit``, ``mean``, ``std``, ``download``, ``decode``)
and ``seed``/``device``, and returns a :class:`DataBundle`, a mapping with ``train``, ``val`` and
optionally ``test``, ``num_classes``, ``in_channels``, ``image_size``, ``mean``, ``std``, or a tuple
``(train, val[, test])``. Each loader is an iterable of ``(x, y)`` batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, fields

import torch

from qkd.data.options import DataBundle, DataOptions
from qkd.errors import QKDError
from qkd.plugins import call_accepting, load_object

_KEYS = {f.name for f in fields(DataBundle)}


def from_factory(opts: DataOptions, device: torch.device, seed: int) -> DataBundle:
    """Call the factory ``opts.name`` names and check what it returns."""
    what = f"data factory '{opts.name}'"
    fn = load_object(opts.name, "data factory")
    offered = {k: v for k, v in asdict(opts).items() if k != "name"} | {"seed": seed, "device": device}
    out = call_accepting(fn, what, offered, {})
    if isinstance(out, DataBundle):
        return out
    if isinstance(out, tuple | list) and len(out) in (2, 3):
        out = dict(zip(("train", "val", "test"), out))
    if not isinstance(out, Mapping) or "train" not in out or "val" not in out:
        raise QKDError(f"{what} must return a DataBundle, a dict with 'train' and 'val', or (train, val[, test]); "
                       f"got {type(out).__name__}")  # fmt: skip
    unknown = set(out) - _KEYS
    if unknown:
        raise QKDError(f"{what} returned unknown keys {sorted(unknown)}; valid: {', '.join(sorted(_KEYS))}")
    for split in ("train", "val", "test"):
        if out.get(split) is not None and not isinstance(out[split], Iterable):
            raise QKDError(f"{what}: '{split}' is not an iterable of (x, y) batches")
    in_channels = out.get("in_channels") or _channels(out["val"], what)
    return DataBundle(**{"test": None, "num_classes": None, **out, "in_channels": in_channels})


def _channels(loader: Iterable, what: str) -> int:
    """Input channels read off the first batch (dim 1 of x)."""
    try:
        x = next(iter(loader))[0]
    except (StopIteration, TypeError, IndexError):
        raise QKDError(f"{what}: the validation loader gives no (x, y) batch") from None
    return int(x.shape[1]) if x.dim() > 1 else 1
