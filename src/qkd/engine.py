"""One epoch of training or evaluation. Knows phases only through ``train_mode()`` and ``step()``."""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from qkd.dist import is_main_process


def _progress(loader: Iterable, desc: str) -> Iterable:
    # Bars only on an interactive terminal; logs in files stay one line per epoch.
    show = is_main_process() and sys.stderr.isatty()
    return tqdm(loader, desc=desc, leave=False, disable=not show, dynamic_ncols=True)


def _to(batch: tuple[Tensor, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    x, y = batch
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def train_epoch(phase, loader: Iterable, schedulers: list, device: torch.device, desc: str = "train") -> dict:
    """Run ``phase.step`` over ``loader``; schedulers step per batch. Returns mean loss and accuracy.

    Sums stay on the device so the loop never waits for the host.
    """
    phase.train_mode()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for batch in _progress(loader, desc):
        x, y = _to(batch, device)
        loss, logits = phase.step(x, y)
        for sched in schedulers:
            sched.step()
        loss_sum += loss * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    return {"train_loss": loss_sum.item() / max(seen, 1), "train_acc": correct.item() / max(seen, 1)}


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device) -> float:
    """Top-1 accuracy of ``model`` in eval mode; the model's training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for batch in loader:
        x, y = _to(batch, device)
        correct += (model(x).argmax(1) == y).sum()
        seen += len(y)
    model.train(was_training)
    return correct.item() / max(seen, 1)
