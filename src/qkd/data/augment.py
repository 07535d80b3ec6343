"""Batched augmentation and normalisation on whole NCHW tensors.

The small data sets this package trains on (digits, CIFAR) fit in device memory as one uint8 tensor, so a
batch is augmented with a handful of indexing ops instead of one Python call per image (the airbench /
hlb-CIFAR10 technique); that keeps a GPU busy where torchvision's per-image transforms would starve it.

Every random draw comes from an explicit ``torch.Generator`` so that an epoch's augmentation is a pure
function of its seed, which is what lets an interrupted training run resume bit-for-bit. The draws are
split from their application (``crop_offsets``/``crop_at``, ``flip_mask``/``flip_where``) so a loader can
draw a whole epoch at once on the CPU and move it to the device in one copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "crop_at",
    "crop_offsets",
    "flip_mask",
    "flip_where",
    "normalize",
    "normalize_affine",
    "random_crop",
    "random_flip",
]


def crop_offsets(n: int, padding: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Draw each image's crop corner (dy, dx), both in [0, 2*padding], on the generator's device."""
    high = 2 * padding + 1
    dy = torch.randint(0, high, (n,), generator=generator, device=generator.device)
    dx = torch.randint(0, high, (n,), generator=generator, device=generator.device)
    return dy, dx


def crop_at(x: Tensor, padding: int, dy: Tensor, dx: Tensor) -> Tensor:
    """Zero-pad ``x`` by ``padding`` and cut each image's original-size window at its own corner.

    One ``gather`` over the flattened pixels does the whole batch: no loop over images, and about 4x
    faster on CPU than advanced indexing with four broadcast index grids.
    """
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (padding, padding, padding, padding))
    padded_w = w + 2 * padding
    rows = dy.to(dev).view(n, 1, 1) + torch.arange(h, device=dev).view(1, h, 1)
    cols = dx.to(dev).view(n, 1, 1) + torch.arange(w, device=dev).view(1, 1, w)
    flat = (rows * padded_w + cols).view(n, 1, h * w).expand(n, c, h * w)
    return padded.flatten(2).gather(2, flat).view(n, c, h, w)


def random_crop(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Random translation by up to ``padding`` pixels (pad with zeros, crop back to the original size)."""
    if padding <= 0:
        return x
    dy, dx = crop_offsets(x.shape[0], padding, generator)
    return crop_at(x, padding, dy, dx)


def flip_mask(n: int, generator: torch.Generator, p: float = 0.5) -> Tensor:
    """Draw which images to flip: each one independently with probability ``p``."""
    return torch.rand(n, generator=generator, device=generator.device) < p


def flip_where(x: Tensor, mask: Tensor) -> Tensor:
    """Mirror (left-right) the images of ``x`` selected by the boolean ``mask``."""
    return torch.where(mask.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


def random_flip(x: Tensor, generator: torch.Generator, p: float = 0.5) -> Tensor:
    """Horizontal flip of a random subset (each image with probability ``p``; half on average)."""
    return flip_where(x, flip_mask(x.shape[0], generator, p))


def normalize_affine(
    mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Fold ``/255``, ``-mean`` and ``/std`` into one scale and shift, shaped (1, C, 1, 1).

    Precomputing these once per loader turns per-batch normalisation into one multiply and one subtract.
    """
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
    if mean_t.numel() != std_t.numel():
        raise ValueError(f"mean has {mean_t.numel()} values but std has {std_t.numel()}")
    if bool((std_t <= 0).any()):
        raise ValueError("std must be positive")
    return 1.0 / (255.0 * std_t), mean_t / std_t


def normalize(x: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """Map 0..255 pixels (uint8 or float) to float32 ``(x/255 - mean) / std`` per channel.

    Data stay uint8 until here so the resident data set and the augmentation touch 4x fewer bytes.
    """
    scale, shift = normalize_affine(mean, std, x.device)
    if scale.shape[1] != x.shape[1]:
        raise ValueError(f"mean/std have {scale.shape[1]} channels but the images have {x.shape[1]}")
    return torch.mul(x, scale).sub_(shift)
