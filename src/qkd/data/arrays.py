"""In-memory sources: digits, CIFAR-10/100 and ``.npz`` arrays, loaded as uint8 arrays and served by
:class:`~qkd.data.tensor_loader.TensorLoader` straight from device memory.

Adding one is one function in ``ARRAY_SOURCES`` that returns :class:`Arrays`; splitting, limiting,
normalisation and loaders are shared (:func:`bundle_from_arrays`).
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from qkd.data.options import DataBundle, SourceOptions
from qkd.data.splits import channel_stats, resolve_stats, three_splits
from qkd.data.tensor_loader import TensorLoader
from qkd.distributed import rank, world_size
from qkd.errors import QKDError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
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
    train_path, test_path = npz_paths(root)
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


def npz_paths(root: str | None) -> tuple[Path, Path]:
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


ARRAY_SOURCES: dict[str, Callable[[str | None, bool], Arrays]] = {
    "digits": _load_digits,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "npz": _load_npz,
}
#: built-in sources that read no files: a ``data.root`` given for one is a mistake, not a setting to ignore
NO_FILES = frozenset({"digits"})


def bundle_from_arrays(a: Arrays, o: SourceOptions) -> DataBundle:
    """Shared path for every in-memory source: stats, splits, limit, and three TensorLoaders."""
    channels = a.train_x.shape[-1]
    if a.mean is None or a.std is None:
        default_mean, default_std = channel_stats(a.train_x)  # before the val split: seed-independent
    else:
        default_mean, default_std = a.mean, a.std
    mean, std = resolve_stats(o, default_mean, default_std, channels)
    arrays = {"train": (a.train_x, a.train_y), "test": (a.test_x, a.test_y)}
    loaders = {name: _tensor_loader(a, *arrays[src], idx, name == "train", (mean, std), o)
               for name, (src, idx) in three_splits(a.train_y, a.test_y, o).items()}  # fmt: skip
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
    o: SourceOptions,
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
        per_pass=o.epoch_images if train else None,
    )


def _to_nchw(x: np.ndarray, idx: np.ndarray, device: torch.device) -> Tensor:
    """Select rows and go NHWC -> NCHW; the permute runs after the move, i.e. on the GPU when there is one."""
    rows = torch.from_numpy(np.ascontiguousarray(x[idx]))
    return rows.to(device).permute(0, 3, 1, 2).contiguous()
