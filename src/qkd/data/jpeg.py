"""Image files to normalised 224 px batches with TorchCodec's image decoders and torchvision's tensor transforms.

Behind ``data.decode`` for image folders (``pil``, the default, is torchvision's PIL recipe in
:mod:`qkd.data.sources`):

- ``cpu``: the loader workers decode each file and crop it with tensor ops (:class:`DecodeHere`);
- ``cuda``: the workers only read each file and draw its crop (:class:`Prepare`); the main process decodes
  the batch's JPEGs at once with nvJPEG (``decode_jpeg(list, device="cuda")``), then crops, resizes, flips and
  normalises on the GPU (:func:`finish_batch`).

The decoders are TorchCodec's (``torchcodec.decoders``, 0.16 and later: no FFmpeg needed for images; it needs
torch 2.11 or later), which torchvision 0.29 recommends in place of its own. Where TorchCodec is not installed
or does not load, ``torchvision.io``'s decoders do the same work (the same pixels: TorchCodec's are torchvision's,
moved), their per-call deprecation warnings hidden and the reason said once in the log (:func:`decoder`).

Both finish through the same :func:`finish_batch`, on whatever device it is given, so the GPU path's logic is
the CPU path's. The crop is drawn from the image size with torchvision's own ``RandomResizedCrop.get_params``
and the flip as ``RandomHorizontalFlip`` draws it, in the PIL recipe's order, from the process's torch RNG
(a loader worker's is seeded from the loader's seed): data order and augmentation are reproducible, and every
mode draws the same crops. Evaluation resizes the shorter side to 256 and centre-crops 224. Resizes are
bilinear and antialiased, as PIL's are (in the tests, the pixels match PIL's to rounding; nvJPEG's may differ
a little more).

Files that are not plain RGB JPEGs (PNG, grayscale or CMYK JPEG, ...) are decoded on the CPU, in the worker:
with the decoder's ``decode_image`` where it reads the format, else with Pillow (BMP, TIFF), always to RGB.
"""

from __future__ import annotations

import functools
import io
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor

from qkd.errors import QKDError

__all__ = ["Crop", "DecodeHere", "Item", "Prepare", "collate", "crop_resize", "decode_cpu", "finish_batch"]

SIZE = 224  # the crop the model sees
RESIZE = 256  # evaluation: the shorter side before the centre crop
log = logging.getLogger("qkd")


class Crop(NamedTuple):
    """A training crop: ``RandomResizedCrop``'s box (pixels of the decoded image) and the horizontal flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


class Item(NamedTuple):
    """One image as the workers hand it over: ``data`` is the file's bytes (1-D uint8, a JPEG for nvJPEG) or
    the image decoded already (uint8 CHW, RGB); ``crop`` None means evaluation (resize, centre crop); ``path``
    names the file in errors."""

    data: Tensor
    crop: Crop | None
    path: str = "image"


def file_path(path: str) -> str:
    """The ``ImageFolder`` loader of the tensor modes: the transform reads the file itself."""
    return path


class Decoder(NamedTuple):
    """The image decoders of ``data.decode``: ``image`` (1-D uint8 bytes of any format it reads -> uint8 RGB
    [N]CHW; RuntimeError or ValueError where it does not read it) and ``jpegs`` (a list of JPEGs -> uint8 RGB CHW
    on ``device``, at once: nvJPEG on a GPU); ``name`` says whose they are."""

    name: str
    image: Callable[[Tensor], Tensor]
    jpegs: Callable[[list[Tensor], torch.device], list[Tensor]]


@functools.cache
def decoder() -> Decoder:
    """TorchCodec's decoders where TorchCodec is installed and loads beside this torch, else torchvision's
    (said once in the log where torchvision deprecates them, as 0.29 does)."""
    try:
        from torchcodec.decoders import decode_image, decode_jpeg
    except (ImportError, OSError, RuntimeError) as e:  # not installed, or built for another torch
        return _torchvision_decoder(next(iter(str(e).splitlines()), type(e).__name__))
    return Decoder("torchcodec", lambda data: decode_image(data, mode="RGB"),
                   lambda data, device: decode_jpeg(data, mode="RGB", device=device))  # fmt: skip


def _torchvision_decoder(why: str) -> Decoder:
    """torchvision.io's decoders, their deprecation warning (one at every call) hidden: said once here instead."""
    import torchvision
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    if tuple(int(v) for v in torchvision.__version__.split(".")[:2]) >= (0, 29):
        log.warning("data.decode: TorchCodec's image decoders are not available (%s); decoding with torchvision.io, "
                    "whose decoders torchvision %s deprecates for TorchCodec's (the same pixels): pip install "
                    "torchcodec, with torch 2.11 or later", why, torchvision.__version__)  # fmt: skip

    def image(data: Tensor) -> Tensor:
        with _quiet():
            return decode_image(data, ImageReadMode.RGB)

    def jpegs(data: list[Tensor], device: torch.device) -> list[Tensor]:
        with _quiet():
            return decode_jpeg(data, ImageReadMode.RGB, device=device)

    return Decoder("torchvision", image, jpegs)


@contextmanager
def _quiet() -> Iterator[None]:
    """torchvision 0.29 deprecates its decoders (for TorchCodec) with a warning at every call: said once instead,
    where :func:`decoder` falls back to them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding", category=DeprecationWarning)
        yield


def read(path: str) -> Tensor:
    """The file's bytes as a 1-D uint8 tensor."""
    with open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)


def decode_cpu(data: Tensor, path: str = "image") -> Tensor:
    """An encoded image (1-D uint8) to uint8 RGB CHW on the CPU: the :func:`decoder`'s ``decode_image`` (JPEG,
    PNG, WebP, GIF: first frame), else Pillow for the formats it does not read (BMP, TIFF, ...)."""
    try:
        image = decoder().image(data)
        return image[0] if image.dim() == 4 else image  # an animated GIF: its first frame, as Pillow gives
    except (RuntimeError, ValueError):  # a format the decoder does not read
        pass
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.v2.functional import pil_to_tensor

    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
            return pil_to_tensor(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise QKDError(f"{path}: neither {decoder().name} nor Pillow can decode it ({e})") from None


def draw_crop(image) -> Crop:
    """A training crop for ``image`` (a PIL image, its header is enough, or a CHW tensor), drawn from the
    torch RNG exactly as ``RandomResizedCrop(224)`` then ``RandomHorizontalFlip()`` draw theirs."""
    rrc = _random_resized_crop()
    top, left, height, width = rrc.get_params(image, rrc.scale, rrc.ratio)
    return Crop(top, left, height, width, bool(torch.rand(1) < 0.5))


@functools.cache
def _random_resized_crop():
    """The PIL recipe's transform, for torchvision's own default scale and ratio."""
    from torchvision.transforms import RandomResizedCrop

    return RandomResizedCrop(SIZE)


def crop_resize(image: Tensor, crop: Crop | None) -> Tensor:
    """uint8 CHW -> uint8 3x224x224 on the image's device: the crop resized (and flipped), or for evaluation
    the shorter side resized to 256 and the centre 224 cut out. Bilinear, antialiased."""
    import torchvision.transforms.v2.functional as F
    from torchvision.transforms import InterpolationMode

    bilinear = InterpolationMode.BILINEAR
    if crop is None:
        return F.center_crop(F.resize(image, [RESIZE], interpolation=bilinear, antialias=True), [SIZE])
    out = F.resized_crop(image, crop.top, crop.left, crop.height, crop.width, [SIZE, SIZE], bilinear, antialias=True)
    return F.horizontal_flip(out) if crop.flip else out


def finish_batch(items: Sequence[Item], device: torch.device, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """The batch (float32 NCHW, normalised) on ``device`` from the workers' items: JPEG bytes decoded there at
    once (nvJPEG on a GPU), decoded images moved there, then each cropped and resized, stacked, normalised."""
    import torchvision.transforms.v2.functional as F

    images = [it.data for it in items]
    encoded = [i for i, it in enumerate(items) if it.data.dim() == 1]
    if encoded:
        for i, image in zip(encoded, _decode_jpegs([items[i] for i in encoded], device), strict=True):
            images[i] = image
    x = torch.stack([crop_resize(im.to(device), it.crop) for im, it in zip(images, items, strict=True)])
    return F.normalize(F.to_dtype(x, torch.float32, scale=True), list(mean), list(std))


_fallback_logged = False


def _decode_jpegs(items: list[Item], device: torch.device) -> list[Tensor]:
    """JPEG bytes to uint8 RGB CHW on ``device``, all in one call; if that fails (nvJPEG cannot read one of
    them), each on the CPU and moved, said once in the log."""
    global _fallback_logged
    try:
        return decoder().jpegs([it.data for it in items], device)
    except RuntimeError as e:
        if not _fallback_logged:
            _fallback_logged = True
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            log.warning("decode_jpeg on %s failed for a batch (%s): such batches decode on the CPU", device, first)
    return [decode_cpu(it.data, it.path).to(device) for it in items]


class Prepare:
    """``data.decode=cuda``, in the loader worker: read the file, draw the crop from its size (Pillow reads the
    header only), and hand over the bytes of a plain RGB JPEG for nvJPEG, or the image decoded here else."""

    def __init__(self, train: bool) -> None:
        self.train = train
        decoder()  # chosen (and a fallback said) here, in the main process

    def __call__(self, path: str) -> Item:
        from PIL import Image, UnidentifiedImageError

        raw = read(path)
        try:
            with Image.open(io.BytesIO(raw.numpy())) as header:
                nvjpeg = header.format == "JPEG" and header.mode == "RGB"
                crop = draw_crop(header) if self.train else None
        except (OSError, UnidentifiedImageError) as e:
            raise QKDError(f"{path}: Pillow cannot read its header ({e})") from None
        return Item(raw if nvjpeg else decode_cpu(raw, path), crop, path)


class DecodeHere:
    """``data.decode=cpu``: the whole image in the loader worker (decode, crop, resize, flip, normalise)."""

    def __init__(self, train: bool, mean: Sequence[float], std: Sequence[float]) -> None:
        self.train, self.mean, self.std = train, tuple(mean), tuple(std)
        decoder()  # chosen (and a fallback said) here, in the main process

    def __call__(self, path: str) -> Tensor:
        image = decode_cpu(read(path), path)
        item = Item(image, draw_crop(image) if self.train else None, path)
        return finish_batch([item], torch.device("cpu"), self.mean, self.std)[0]


def collate(batch: list[tuple[Item, int]]) -> tuple[list[Item], Tensor]:
    """``data.decode=cuda``'s batches: the items as a list (their byte strings differ in length), the labels."""
    items, labels = zip(*batch, strict=True)
    return list(items), torch.tensor(labels, dtype=torch.int64)
