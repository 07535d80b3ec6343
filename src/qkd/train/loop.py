"""One epoch of training or evaluation. Knows phases only through ``train_mode()`` and ``step()``."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from qkd.dist import is_main_process
from qkd.errors import QKDError


def _progress(loader: Iterable, desc: str) -> Iterable:
    # Bars only on an interactive terminal; logs in files stay one line per epoch.
    show = is_main_process() and sys.stderr.isatty()
    return tqdm(loader, desc=desc, leave=False, disable=not show, dynamic_ncols=True)


@dataclass(frozen=True)
class Runtime:
    """Where and how batches run: device, memory layout, mixed precision."""

    device: torch.device = torch.device("cpu")
    channels_last: bool = False
    amp: bool = False

    def batch(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            what = f"a dict with keys {sorted(batch)}" if isinstance(batch, dict) else type(batch).__name__
            raise QKDError(f"a batch must be an (x, y) pair of tensors, got {what}; wrap the loader to yield (x, y)")
        x, y = batch
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def autocast(self) -> torch.autocast:
        # bf16 needs no loss scaling; on the CPU autocast is off (it is slower there, not faster).
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp and self.device.type == "cuda")


def train_epoch(phase, loader: Iterable, schedulers: list, rt: Runtime, desc: str = "train") -> dict:
    """Run ``phase.step`` over ``loader``; schedulers step per batch. Returns mean loss and accuracy.

    Sums stay on the device so the loop never waits for the host.
    """
    phase.train_mode()
    loss_sum = torch.zeros((), device=rt.device)
    correct = torch.zeros((), device=rt.device, dtype=torch.long)
    seen = 0
    for batch in _progress(loader, desc):
        x, y = rt.batch(batch)
        with rt.autocast():
            loss, logits = phase.step(x, y)
        for sched in schedulers:
            sched.step()
        loss_sum += loss * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    return {"train_loss": loss_sum.item() / max(seen, 1), "train_acc": correct.item() / max(seen, 1)}


# no_grad, not inference_mode: inference tensors carry other dispatch keys, and each such variant made the
# compiled fake-quant kernels recompile (on CUDA with autocast they hit dynamo's limit and fell back to eager)
@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, rt: Runtime) -> float:
    """Top-1 accuracy of ``model`` in eval mode; the model's training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=rt.device, dtype=torch.long)
    seen = 0
    for batch in loader:
        x, y = rt.batch(batch)
        with rt.autocast():
            correct += (model(x).argmax(1) == y).sum()
        seen += len(y)
    model.train(was_training)
    return correct.item() / max(seen, 1)
