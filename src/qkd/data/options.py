"""The data options, defined once: the ``data`` section of a run config and :func:`build_data`'s arguments."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: ``data.decode``: how image folders are decoded (the other sources are decoded once, into memory)
DECODE_MODES = ("pil", "cpu", "cuda")


@dataclass
class DataOptions:
    """Which data and how it is served.

    - ``name``: a built-in source (``qkd list``) or a factory by import path, ``mypkg.data:loaders``;
      ``root`` the folder or file it reads.
    - ``batch_size`` (training) and ``eval_batch_size``; ``val_size``: a fraction (< 1) or a count of
      images carved out as the validation split, from the training split (``val_from=train``) or, fixed once
      whatever the seed, from the test split (``val_from=test``: the rest is the test split and every training
      image trains; use it when pretrained weights saw the whole training split); ``mean``/``std``:
      normalisation (None: the source's own); ``augment``: random crop and flip where the source allows them;
      ``download``: fetch when you have a network; ``num_workers``: loader processes for streamed images.
    - ``decode``: how image folders (``imagefolder``, the one streamed source) decode and crop: ``pil`` (PIL and
      torchvision's transforms in the loader workers), ``cpu`` (TorchCodec's decoders, else ``torchvision.io``'s,
      and tensor crops in the workers, faster), ``cuda`` (the workers read the files and draw the crops; the
      batch is decoded with nvJPEG and cropped on the GPU; needs the run on CUDA). Every mode draws the same
      crops from the same seed.
    - ``limit``: at most this many images per split (quick runs); ``train_limit``: for the training split
      alone (val/test whole); ``epoch_images``: each training epoch draws this many images afresh, without
      repeats within it, from the whole training split (after ``train_limit``), so that a budget counted in
      images seen (4 epochs of 12,500) is not a fixed subset seen 4 times; in-memory sources only.
    """

    __pydantic_config__ = {"extra": "forbid"}  # read when the run config embeds this class

    name: str = "digits"
    root: str | None = field(default=None, metadata={"where": True})  # where, not what: qkd.config.WHERE
    batch_size: int = 64
    eval_batch_size: int = field(default=512, metadata={"where": True})
    val_size: float = 0.1
    val_from: str = "train"
    mean: list[float] | None = None
    std: list[float] | None = None
    augment: bool = True
    download: bool = field(default=False, metadata={"where": True})
    num_workers: int = field(default=2, metadata={"where": True})
    limit: int | None = None
    train_limit: int | None = None
    epoch_images: int | None = None
    decode: str = field(default="pil", metadata={"where": True})

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_size} and {self.eval_batch_size}")
        if not self.val_size > 0 or (self.val_size >= 1 and self.val_size != int(self.val_size)):
            raise ValueError(f"data.val_size must be a fraction below 1 (e.g. 0.1) or a whole number of images "
                             f"(e.g. 500), got {self.val_size}")  # fmt: skip
        if self.val_from not in ("train", "test"):
            raise ValueError(f"data.val_from must be train or test, got {self.val_from!r}")
        for name, value in (("limit", self.limit), ("train_limit", self.train_limit),
                            ("epoch_images", self.epoch_images)):  # fmt: skip
            if value is not None and value < 1:
                raise ValueError(f"data.{name} must be >= 1 or unset, got {value}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.decode not in DECODE_MODES:
            raise ValueError(f"data.decode must be pil, cpu or cuda, got {self.decode!r}")

    @property
    def train_cap(self) -> int | None:
        return self.train_limit if self.train_limit is not None else self.limit


@dataclass
class DataBundle:
    """Everything a training job needs from its data: three loaders and the shape facts for the model."""

    train: Iterable  # yields (x, y) batches: TensorLoader, StreamLoader or a user factory's loader
    val: Iterable
    test: Iterable | None
    num_classes: int | None  # None: a user factory did not say (then models are built without it)
    in_channels: int
    image_size: int | None = None
    mean: tuple[float, ...] | None = None  # the normalisation the loaders apply (None: unknown)
    std: tuple[float, ...] | None = None


@dataclass
class SourceOptions(DataOptions):
    """What a source is built from: the data options, where the loaders serve from (device), their seed."""

    device: torch.device = field(default_factory=lambda: _cpu())
    seed: int = 0


def _cpu() -> torch.device:
    import torch  # here, not above: the data options are read with the config, which needs no torch

    return torch.device("cpu")
