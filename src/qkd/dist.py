"""Process-group awareness in one place, so DDP slots in without touching the rest.

Everything that writes (logs, checkpoints, summaries) asks :func:`is_main_process` first.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
from torch import nn

from qkd.errors import QKDError

DEVICES = "auto, cpu, cuda, cuda:N (GPU number N) or mps"


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def broadcast_state(module: nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s parameters and buffers (e.g. quantizer steps after calibration)."""
    if is_distributed():
        for t in itertools.chain(module.parameters(), module.buffers()):
            dist.broadcast(t.data, src)


def is_main_process() -> bool:
    return rank() == 0


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present (this rank's GPU), else the CPU; a device that is not here is refused."""
    if name == "auto":
        name = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise QKDError(f"'{name}' is not a device; use {DEVICES}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QKDError(f"device '{name}' requested but CUDA is not available; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise QKDError(f"device '{name}' requested but this machine has {torch.cuda.device_count()} GPU(s) "
                       "(cuda:0 is the first); use another number, or cuda")  # fmt: skip
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise QKDError(f"device '{name}' requested but MPS (Apple GPUs) is not available; use --device cpu (or auto)")
    return device
