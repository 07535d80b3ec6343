"""Quantize any model by swapping its Conv2d/Linear layers in place (torchao-style).

>>> model = quantize_model(torchvision.models.resnet18(), QuantConfig(weight_bits=4, act_bits=4))
>>> with quantization_disabled(model):
...     float_logits = model(x)  # the same network, evaluated in float
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from qkd.quant.modules import QUANT_MODULES
from qkd.quant.quantizers import QUANTIZERS, STEP_INITS, Quantizer, QuantSpec, parse_bits

FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class QuantConfig:
    """Bit-widths and quantizer choice for a whole model.

    - ``weight_bits`` / ``act_bits``: 2..8, or None (or "float") to leave that side in float.
    - ``method``: a quantizer name (``lsq`` or ``interval``); ``per_channel``: weight steps per
      output channel. Activations are always per tensor.
    - ``bn_batches``: after the quantizers are initialised, re-estimate BatchNorm statistics of the
      quantized network on this many training batches (0 = keep the float statistics); quantized
      activations shift the statistics, and a pretrained network collapses at 2-3 bits without it.
    - ``step_init``: how LSQ steps start, ``mse`` (least quantization error on the first tensor
      seen) or ``lsq`` (the LSQ paper's ``2 mean|x| / sqrt(Qp)``).
    - ``first_last_bits``: bits of the first and last quantized layers (8 by default, the usual
      practice); "same" uses ``weight_bits``/``act_bits`` there too, None keeps them float. A side
      whose ``weight_bits``/``act_bits`` is float stays float at the edges as well.
    - ``overrides``: module-name patterns (fnmatch, e.g. ``"layer3.*"``) mapped to
      ``{"weight_bits": .., "act_bits": ..}``; later patterns win.
    """

    __pydantic_config__ = {"extra": "forbid"}  # read when the run config embeds this class

    weight_bits: int | str | None = 4
    act_bits: int | str | None = 4
    method: str = "lsq"
    step_init: str = "mse"
    bn_batches: int = 20
    per_channel: bool = True
    first_last_bits: int | str | None = 8
    overrides: dict[str, dict[str, int | str | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.weight_bits, self.act_bits = parse_bits(self.weight_bits), parse_bits(self.act_bits)
        if self.first_last_bits != "same":
            self.first_last_bits = parse_bits(self.first_last_bits)
        if self.method not in QUANTIZERS:
            raise ValueError(f"unknown quantizer '{self.method}'; valid: {', '.join(sorted(QUANTIZERS))}")
        if self.step_init not in STEP_INITS:
            raise ValueError(f"unknown step_init '{self.step_init}'; valid: {', '.join(STEP_INITS)}")
        if not isinstance(self.bn_batches, int) or self.bn_batches < 0:
            raise ValueError(f"bn_batches must be a non-negative integer; got {self.bn_batches!r}")
        for pattern, bits in self.overrides.items():
            unknown = set(bits) - {"weight_bits", "act_bits"}
            if unknown:
                raise ValueError(f"override '{pattern}' has unknown keys {sorted(unknown)}; use weight_bits/act_bits")
            self.overrides[pattern] = {k: parse_bits(v) for k, v in bits.items()}

    def bits_for(self, name: str, is_edge: bool) -> tuple[int | None, int | None]:
        """Weight and activation bits of the layer called ``name``."""
        wb, ab = self.weight_bits, self.act_bits
        if is_edge and self.first_last_bits != "same":
            # A side configured as float stays float at the edges too (e.g. weight-only quantization).
            wb = None if wb is None else self.first_last_bits
            ab = None if ab is None else self.first_last_bits
        for pattern, bits in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                wb, ab = bits.get("weight_bits", wb), bits.get("act_bits", ab)
        return wb, ab


def default_filter(module: nn.Module, name: str) -> bool:
    """Quantize every plain Conv2d and Linear."""
    return type(module) in QUANT_MODULES


def quantize_model(
    model: nn.Module, config: QuantConfig | None = None, filter_fn: FilterFn = default_filter
) -> nn.Module:
    """Swap the layers ``filter_fn`` selects for quantized ones, in place, and return ``model``.

    First and last layers are taken in module registration order, which is execution order for the
    usual Sequential/ResNet definitions.
    """
    config = config or QuantConfig()
    targets = [(n, m) for n, m in model.named_modules() if n and filter_fn(m, n) and type(m) in QUANT_MODULES]
    edges = {targets[0][0], targets[-1][0]} if targets else set()
    for name, module in targets:
        wb, ab = config.bits_for(name, name in edges)
        wspec = QuantSpec(wb, signed=True, per_channel=config.per_channel, method=config.method,
                          step_init=config.step_init)  # fmt: skip
        aspec = QuantSpec(ab, signed=None, per_channel=False, method=config.method, step_init=config.step_init)
        _set_submodule(model, name, QUANT_MODULES[type(module)].from_float(module, wspec, aspec))
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Swap quantized layers back for float ones sharing the same parameters, in place."""
    for name, module in list(model.named_modules()):
        if hasattr(module, "to_float") and hasattr(module, "weight_quant"):
            _set_submodule(model, name, module.to_float())
    return model


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """Every quantizer in ``model`` with its qualified name."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, Quantizer))


def is_quantized(model: nn.Module) -> bool:
    return any(q.bits is not None for _, q in quantizers(model))


def quant_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the quantizers (steps, bounds): they get their own optimizer group."""
    return [p for _, q in quantizers(model) for p in q.parameters(recurse=False)]


def set_quantization(model: nn.Module, enabled: bool) -> None:
    """Switch all quantizers on or off (off = the float network with the same weights)."""
    for _, q in quantizers(model):
        q.enabled = enabled


@contextmanager
def quantization_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Evaluate ``model`` in float inside the block; the previous switches come back afterwards."""
    before = {n: q.enabled for n, q in quantizers(model)}
    set_quantization(model, False)
    try:
        yield model
    finally:
        for n, q in quantizers(model):
            q.enabled = before[n]


@torch.no_grad()
def calibrate(model: nn.Module, batch: Tensor) -> None:
    """Initialise every activation quantizer from one batch, in eval mode so BN statistics stay.

    Under data parallelism call it with the same batch on every rank (or broadcast the buffers).
    """
    was_training = model.training
    model.eval()
    model(batch)
    model.train(was_training)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[Tensor]) -> int:
    """Re-estimate every BatchNorm's running statistics as the exact average over ``batches``.

    Run after :func:`calibrate`: the statistics then describe the quantized network. Returns the
    number of batches used; with none, the statistics are left as they were.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(bn.momentum, copy.deepcopy(bn.state_dict())) for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    was_training, used = model.training, 0
    model.train()
    for x in batches:
        model(x)
        used += 1
    model.train(was_training)
    for bn, (momentum, state) in zip(bns, saved):
        bn.momentum = momentum
        if not used:
            bn.load_state_dict(state)
    return used
