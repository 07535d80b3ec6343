"""Process-group awareness in one place: torchrun's environment, ranks, collectives, DDP wrapping.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) :func:`setup` joins the process group (NCCL
on CUDA, gloo on the CPU) and gives each rank its local GPU. Everything that writes (logs,
checkpoints, summaries) asks :func:`is_main_process` first; decisions that every rank must take alike
(stop, divergence, the run folder's name) go through a collective.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from qkd.config import DEVICES
from qkd.errors import QKDError

T = TypeVar("T")


def setup(device: str = "auto") -> None:
    """Join torchrun's process group, once (nothing outside torchrun or with one process)."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if cuda else "gloo"
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart == 0:
        dist.init_process_group(backend)
        return
    # After a torchrun restart, the group's addresses in the store are those of the dead workers: gloo
    # (torch 2.14) then fails in connectFullMesh with "Connection refused". Keys of this attempt's own avoid it.
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    dist.init_process_group(backend, store=dist.PrefixStore(f"qkd/restart_{restart}", store),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))  # fmt: skip


def teardown() -> None:
    """Leave the process group, every rank together (a process that exits with gloo's threads still running
    can abort with "terminate called without an active exception", which torchrun reports as a failure)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks, in place (nothing with one process)."""
    if is_distributed():
        dist.all_reduce(t)
    return t


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 and give every rank its result, or its error (so no rank waits for one that failed)."""
    if not is_distributed():
        return fn()
    box: list[Any] = [None, None]
    if is_main_process():
        try:
            box[0] = fn()
        except QKDError as e:
            box[1] = str(e)
    dist.broadcast_object_list(box, 0)
    if box[1] is not None:
        error = QKDError(box[1])
        error.reported_by_rank_0 = True  # every rank stops; only rank 0 needs to say why
        raise error
    return box[0]


def gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (same shape on all), concatenated along the first dimension: the global batch."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def average_bn_statistics(model: nn.Module) -> None:
    """Average the BatchNorm running statistics over ranks (each estimated them on its own share)."""
    if not is_distributed():
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            for t in (m.running_mean, m.running_var):
                dist.all_reduce(t)
                t /= world_size()


def wrap(model: nn.Module) -> nn.Module:
    """``DistributedDataParallel`` around a model that trains, under torchrun; the model itself otherwise."""
    if not is_distributed():
        return model
    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``SyncBatchNorm`` (BatchNorm over the global batch) under torchrun, GPUs only; the model itself with one
    process. The weights and statistics keep their names, so checkpoints load into the plain model."""
    if world_size() == 1:
        return model
    if device.type != "cuda":
        raise QKDError("runtime.sync_bn needs GPUs (SyncBatchNorm runs on CUDA only); drop it on the CPU")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def launch_rank() -> int:
    """This process's rank, also before the group is joined (torchrun's ``RANK``): who reports an error."""
    return rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def local_batch(batch_size: int, world: int | None = None) -> int:
    """This rank's share of the global batch ``data.batch_size``, refused (by rank 0, once) when not whole."""
    world = world_size() if world is None else world
    if batch_size % world:
        error = QKDError(f"data.batch_size={batch_size} is the global batch and must be a multiple of the {world} "
                         f"processes, e.g. data.batch_size={batch_size // world * world or world}")  # fmt: skip
        error.reported_by_rank_0 = True  # every rank computes the same
        raise error
    return batch_size // world


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
