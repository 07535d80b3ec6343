"""Process-group awareness in one place, so DDP slots in without touching the rest.

Everything that writes (logs, checkpoints, summaries) asks :func:`is_main_process` first.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
from torch import nn


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
    """``auto`` is CUDA when present (this rank's GPU), else the CPU."""
    if name == "auto":
        name = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    return torch.device(name)
