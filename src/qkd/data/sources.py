"""Data sources by name behind one function, :func:`build_data`.

Small sources (digits, CIFAR, ``.npz`` arrays) are loaded as uint8 arrays and served by
:class:`~qkd.data.tensor_loader.TensorLoader` straight from device memory. Adding one is one function in
``_ARRAY_SOURCES`` that returns :class:`Arrays`; splitting, limiting, normalisation and loaders are shared.
Large image folders (ImageNet layout) are streamed from disk through a ``torch.utils.data.DataLoader``.

Every split is deterministic: the test split is fixed by the source, the validation split is carved out
of the training split (never the test split) from ``seed``, so results are comparable across runs.
"""

from __future__ import annotations

import copy
import functools
import math
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qkd.data import jpeg
from qkd.data.factory import from_factory as _from_factory
from qkd.data.options import DataBundle, DataOptions
from qkd.data.tensor_loader import TensorLoader
from qkd.distributed import rank, resolve_device, world_size
from qkd.errors import QKDError

__all__ = ["Arrays", "DataBundle", "StreamLoader", "build_data", "list_datasets"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NPZ_EXPECTED = (
    "expected uint8 x of shape (N,H,W,C) and int y of shape (N,), or undecoded images as uint8 jpeg (the files "
    "concatenated) and int offsets (N+1) with y"
)


@dataclass
class Arrays:
    """One in-memory source as loaded: uint8 NHWC images and int labels per split, plus its defaults.

    ``mean``/``std`` None means "compute from ``train_x``"; ``crop_padding``/``flip`` are the source's
    augmentation, since not every data set tolerates it (mirrored digits are different digits).
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    crop_padding: int = 0
    flip: bool = False


@dataclass
class _Options(DataOptions):
    """The data options plus where the loaders serve from (device) and how they are seeded."""

    device: torch.device = torch.device("cpu")
    seed: int = 0


# --------------------------------------------------------------------------------------------- sources


def _load_digits(root: str | None, download: bool) -> Arrays:
    """scikit-learn's bundled 8x8 digits: offline, tiny, and enough to smoke-test the whole pipeline."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return Arrays(train_x, train_y, test_x, test_y, num_classes=10)


def _load_cifar(root: str | None, download: bool, *, num_classes: int) -> Arrays:
    """CIFAR-10/100 in torchvision's on-disk layout (optionally downloaded there by torchvision)."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls, label = (CIFAR10, "CIFAR-10") if num_classes == 10 else (CIFAR100, "CIFAR-100")
    root = root or "data"
    if Path(root).exists() and not Path(root).is_dir():
        raise QKDError(f"data.root {root} is a file; {label} is read from (and downloaded to) a folder")
    try:
        train = cls(root, train=True, download=download)
        test = cls(root, train=False, download=download)
    except RuntimeError as e:
        hint = "fix data.root" if download else "pass data.download=true to download it, or fix data.root"
        raise QKDError(f"no {label} data in torchvision's layout at {root}; {hint}") from e
    except OSError as e:
        raise QKDError(f"could not download {label} to {root}: {e}") from e
    stats = (CIFAR10_MEAN, CIFAR10_STD) if num_classes == 10 else (CIFAR100_MEAN, CIFAR100_STD)
    return Arrays(
        np.asarray(train.data, dtype=np.uint8),
        np.asarray(train.targets, dtype=np.int64),
        np.asarray(test.data, dtype=np.uint8),
        np.asarray(test.targets, dtype=np.int64),
        num_classes=num_classes,
        mean=stats[0],
        std=stats[1],
        crop_padding=4,
        flip=True,
    )


def _load_cifar10(root: str | None, download: bool) -> Arrays:
    return _load_cifar(root, download, num_classes=10)


def _load_cifar100(root: str | None, download: bool) -> Arrays:
    return _load_cifar(root, download, num_classes=100)


def _load_npz(root: str | None, download: bool) -> Arrays:
    """Any image set saved as a train and a test ``.npz`` (``x`` uint8 NHWC, ``y`` int, opt. ``classes``)."""
    train_path, test_path = _npz_paths(root)
    train_x, train_y, train_classes = _read_npz(train_path)
    test_x, test_y, _ = _read_npz(test_path)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise QKDError(f"{train_path} has images of shape {train_x.shape[1:]} but {test_path} has {test_x.shape[1:]}")
    top = int(max(train_y.max(), test_y.max())) + 1
    num_classes = top if train_classes is None else len(train_classes)
    if top > num_classes:
        raise QKDError(f"{train_path} lists {num_classes} classes but its labels go up to {top - 1}")
    big = min(train_x.shape[1], train_x.shape[2]) >= 32
    return Arrays(train_x, train_y, test_x, test_y, num_classes, crop_padding=4 if big else 0, flip=big)


def _npz_paths(root: str | None) -> tuple[Path, Path]:
    """Resolve ``root`` (a folder with one ``*train*.npz`` and one ``*test*.npz``, or the train file)."""
    usage = "a folder holding one *train*.npz and one *test*.npz, or the path of the train .npz"
    if not root:
        raise QKDError(f"data set 'npz' needs data.root: {usage}")
    path = Path(root).expanduser()
    if not path.exists():
        raise QKDError(f"no such file or folder: {path} (npz data.root must be {usage})")
    if path.is_dir():
        return _only_match(path, "*train*.npz"), _only_match(path, "*test*.npz")
    if "train" not in path.name:
        raise QKDError(f"{path}: an npz file given as data.root must have 'train' in its name ({usage})")
    head, _, tail = path.name.rpartition("train")
    test_path = path.with_name(f"{head}test{tail}")
    if not test_path.is_file():
        raise QKDError(f"{path} has no matching test file: expected {test_path}")
    return path, test_path


def _only_match(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise QKDError(f"{folder} must hold exactly one {pattern} file; found {names}")
    return found[0]


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Load and validate one split; every failure names the file and what was expected."""
    try:
        with np.load(path, allow_pickle=False) as f:
            encoded = "x" not in f.files and {"jpeg", "offsets"} <= set(f.files)
            missing = [k for k in (("y",) if encoded else ("x", "y")) if k not in f.files]
            if missing:
                raise QKDError(f"{path}: missing array(s) {', '.join(missing)}; {NPZ_EXPECTED}")
            x = _decode_images(f["jpeg"], f["offsets"], path) if encoded else f["x"]
            y = f["y"]
            classes = f["classes"] if "classes" in f.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise QKDError(f"{path} is not a readable .npz file ({e}); {NPZ_EXPECTED}") from e
    if x.dtype != np.uint8 or x.ndim != 4:
        raise QKDError(f"{path}: {NPZ_EXPECTED}; got x of dtype {x.dtype} and shape {x.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (x.shape[0],):
        raise QKDError(f"{path}: {NPZ_EXPECTED}; got y of dtype {y.dtype} and shape {y.shape}")
    if x.shape[0] == 0:
        raise QKDError(f"{path} holds no images")
    if y.min() < 0:
        raise QKDError(f"{path}: labels must be >= 0, found {int(y.min())}")
    return x, y.astype(np.int64), classes


def _decode_images(data: np.ndarray, offsets: np.ndarray, path: Path) -> np.ndarray:
    """Undecoded image files (JPEG, PNG: whatever Pillow reads), concatenated, back to one uint8 RGB array:
    a form small enough to carry to a remote machine (CIFAR-10: 56 MB of JPEGs against 170 MB of pixels)."""
    import io

    from PIL import Image

    if data.dtype != np.uint8 or offsets.ndim != 1 or len(offsets) < 2 or offsets[-1] != len(data):
        raise QKDError(f"{path}: {NPZ_EXPECTED}; got jpeg {data.dtype} {data.shape} and offsets {offsets.shape}")
    blob = data.tobytes()
    images = [np.asarray(Image.open(io.BytesIO(blob[a:b])).convert("RGB")) for a, b in zip(offsets, offsets[1:])]
    if len({im.shape for im in images}) != 1:
        raise QKDError(f"{path}: the images have different sizes; resize them to one size first")
    return np.stack(images)


_ARRAY_SOURCES: dict[str, Callable[[str | None, bool], Arrays]] = {
    "digits": _load_digits,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "npz": _load_npz,
}
#: built-in sources that read no files: a ``data.root`` given for one is a mistake, not a setting to ignore
_NO_FILES = frozenset({"digits"})


# ------------------------------------------------------------------------------------------ public API


def list_datasets() -> list[str]:
    """Names accepted by :func:`build_data`."""
    return sorted([*_ARRAY_SOURCES, *_STREAM_SOURCES])


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
    if ":" in key:
        return _from_factory(opts, _device(device), seed)
    if key not in _ARRAY_SOURCES and key not in _STREAM_SOURCES:
        valid = ", ".join(list_datasets())
        raise QKDError(f"unknown data set '{opts.name}'; valid data sets: {valid}, or pkg.module:function")
    if key in _NO_FILES and opts.root is not None:
        raise QKDError(f"{key} is built in and reads no files; drop data.root (given: {opts.root}; "
                       "`data.root=` clears the one a preset sets)")  # fmt: skip
    if opts.decode != "pil" and key not in _STREAM_SOURCES:
        raise QKDError(f"{key} is decoded once, into memory; data.decode={opts.decode} applies to imagefolder only, "
                       "drop it")  # fmt: skip
    o = _Options(**{f.name: getattr(opts, f.name) for f in fields(DataOptions)}, device=_device(device), seed=seed)
    if key in _STREAM_SOURCES:
        return _STREAM_SOURCES[key](o.root, o)
    return _bundle_from_arrays(_ARRAY_SOURCES[key](o.root, o.download), o)


def _device(device: str | torch.device) -> torch.device:
    return resolve_device(str(device))


# ------------------------------------------------------------------------------------ splits and stats


VAL_FROM_TEST_SEED = 0  # val_from=test: the same validation images for every run seed


def _split_val(y: np.ndarray, val_size: int | float, seed: int, split: str = "training") -> tuple[np.ndarray, ...]:
    """Indices (rest, val) of a split: val is a seeded, stratified ``val_size`` of it."""
    n = len(y)
    n_val = math.ceil(val_size * n) if isinstance(val_size, float) and val_size < 1 else int(val_size)
    if not 1 <= n_val < n:
        raise QKDError(f"data.val_size={val_size} leaves no {split} images: the {split} split has {n}")
    val, rest = _stratified_pick(y, n_val, seed)
    return rest, val


def _three_splits(train_y: np.ndarray, test_y: np.ndarray, o: _Options) -> dict[str, tuple[str, np.ndarray]]:
    """Each split's source (``train`` or ``test`` arrays/folders) and indices, after ``val_from`` and limits."""
    if o.val_from == "test":
        test_idx, val_idx = _split_val(test_y, o.val_size, VAL_FROM_TEST_SEED, "test")
        splits = {"train": ("train", np.arange(len(train_y))), "val": ("test", val_idx), "test": ("test", test_idx)}
    else:
        train_idx, val_idx = _split_val(train_y, o.val_size, o.seed)
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


def _channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
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


def _resolve_stats(
    o: _Options, default_mean: Sequence[float], default_std: Sequence[float], channels: int
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


# ------------------------------------------------------------------------------------ in-memory bundle


def _bundle_from_arrays(a: Arrays, o: _Options) -> DataBundle:
    """Shared path for every in-memory source: stats, splits, limit, and three TensorLoaders."""
    channels = a.train_x.shape[-1]
    if a.mean is None or a.std is None:
        default_mean, default_std = _channel_stats(a.train_x)  # before the val split: seed-independent
    else:
        default_mean, default_std = a.mean, a.std
    mean, std = _resolve_stats(o, default_mean, default_std, channels)
    arrays = {"train": (a.train_x, a.train_y), "test": (a.test_x, a.test_y)}
    loaders = {name: _tensor_loader(a, *arrays[src], idx, name == "train", (mean, std), o)
               for name, (src, idx) in _three_splits(a.train_y, a.test_y, o).items()}  # fmt: skip
    return DataBundle(
        **loaders,
        num_classes=a.num_classes,
        in_channels=channels,
        image_size=int(a.train_x.shape[1]),
        mean=mean,
        std=std,
    )


def _tensor_loader(
    a: Arrays,
    x: np.ndarray,
    y: np.ndarray,
    idx: np.ndarray,
    train: bool,
    stats: tuple[tuple[float, ...], tuple[float, ...]],
    o: _Options,
) -> TensorLoader:
    """Training loaders shuffle and augment (with the source's augmentation); evaluation loaders do not."""
    return TensorLoader(
        _to_nchw(x, idx, o.device),
        torch.from_numpy(y[idx]),
        batch_size=o.batch_size if train else o.eval_batch_size,
        shuffle=train,
        augment=train and o.augment,
        crop_padding=a.crop_padding,
        flip=a.flip,
        mean=stats[0],
        std=stats[1],
        device=o.device,
        seed=o.seed,
        shard=(rank(), world_size()),  # under torchrun, this rank's share of every batch
    )


def _to_nchw(x: np.ndarray, idx: np.ndarray, device: torch.device) -> Tensor:
    """Select rows and go NHWC -> NCHW; the permute runs after the move, i.e. on the GPU when there is one."""
    rows = torch.from_numpy(np.ascontiguousarray(x[idx]))
    return rows.to(device).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------ streamed sources


class StreamLoader:
    """A ``DataLoader`` that behaves like :class:`TensorLoader`: batches on ``device``, ``set_epoch``.

    Seeding the loader's generator per pass fixes the shuffle order and the worker seeds (hence the
    random transforms when ``num_workers > 0``), so streamed training also resumes reproducibly.
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
            if batch_size % world_size():
                raise QKDError(f"data.batch_size {batch_size} (the global batch) must be a multiple of the "
                               f"{world_size()} processes")  # fmt: skip
            batch_size //= world_size()
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
        return self._moved(iter(self._loader))

    def _moved(self, batches: Iterator[tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in batches:
            if self._finish is not None:
                x = self._finish(x, self.device)
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


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


def _build_imagefolder(root: str | None, o: _Options) -> DataBundle:
    """ImageNet layout: ``root/train/<class>/*`` and ``root/val/<class>/*`` (the latter is the test split)."""
    from torchvision.datasets import ImageFolder

    base = _imagefolder_root(root)
    if o.decode == "cuda":
        _check_gpu_decode(o.device)
    mean, std = _resolve_stats(o, IMAGENET_MEAN, IMAGENET_STD, 3)
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
                        for name, (src, idx) in _three_splits(targets, test_targets, o).items())  # fmt: skip
    return DataBundle(train, val, test, len(train_set.classes), 3, jpeg.SIZE, mean, std)


def _stream(
    dataset: torch.utils.data.Dataset, idx: np.ndarray, train: bool, o: _Options, finish: Callable | None = None
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


def _imagefolder_transforms(mean: Sequence[float], std: Sequence[float], augment: bool) -> tuple:
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
        return default_loader, *_imagefolder_transforms(mean, std, augment)
    if decode == "cpu":
        return jpeg.file_path, jpeg.DecodeHere(augment, mean, std), jpeg.DecodeHere(False, mean, std)
    return jpeg.file_path, jpeg.Prepare(augment), jpeg.Prepare(False)


_STREAM_SOURCES: dict[str, Callable[[str | None, _Options], DataBundle]] = {
    "imagefolder": _build_imagefolder,
}
