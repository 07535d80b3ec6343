"""Optimizers and learning-rate schedules of a stage."""

from __future__ import annotations

import math

import torch
from torch import nn

from qkd.config import OptimConfig
from qkd.quant import quant_parameters
from qkd.train.stages import Stage


def build_optimizer(model: nn.Module, lr: float, o: OptimConfig) -> torch.optim.Optimizer:
    """SGD; weight decay on conv/linear weights only; quantizer parameters in their own group."""
    qparams = {id(p) for p in quant_parameters(model)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad and id(p) not in qparams:
            (decay if p.dim() > 1 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": quant_parameters(model), "weight_decay": 0.0, "lr": o.quant_lr or lr},
    ]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=lr, momentum=o.momentum, nesterov=o.nesterov)


def build_scheduler(
    opt: torch.optim.Optimizer, stages: list[Stage], i: int, batches: int, schedule: str
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-batch cosine decay over stage ``i``, or (``schedule="run"``) that stage's stretch of one
    decay over all quantized stages, so that a new phase does not restart at the full rate."""
    stage = stages[i]
    if schedule == "phase" or not stage.quantized:
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(stage.epochs * batches, 1))
    offset = sum(s.epochs for s in stages[:i] if s.quantized) * batches
    total = max(sum(s.epochs for s in stages if s.quantized) * batches, 1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * (offset + t) / total)))
