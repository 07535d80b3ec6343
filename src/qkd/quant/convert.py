"""Quantize any model: every Conv/Linear-like layer is quantized, in place (torchao-style).

Plain ``nn.Conv2d`` / ``nn.Linear`` layers (and subclasses that only add initialisation) are swapped
for :class:`~qkd.quant.modules.QConv2d` / :class:`~qkd.quant.modules.QLinear`; every other
Conv/Linear-like layer (Conv1d/3d, ConvTranspose, a subclass with its own forward) is quantized in
place, keeping its forward (:class:`~qkd.quant.modules.QuantizedLayer`). Nothing is skipped silently:
a layer that cannot be quantized is refused, and those left float are listed by
:func:`~qkd.quant.summary.quantization_summary` with the reason.

>>> model = quantize_model(torchvision.models.resnet18(), QuantConfig(weight_bits=4, act_bits=4))
>>> print(quantization_summary(model))
>>> with quantization_disabled(model):
...     float_logits = model(x)  # the same network, evaluated in float
"""

from __future__ import annotations

import copy
import difflib
import functools
import inspect
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from qkd.errors import QKDError
from qkd.quant.attention import restore_attention, swap_attention
from qkd.quant.config import EDGE, QuantConfig, QuantSpec, matches
from qkd.quant.modules import (
    FLOAT_REASON,
    QUANT_MODULES,
    SWAPPED,
    QuantizedLayer,
    dequantize_in_place,
    is_quantized_layer,
    quantize_in_place,
)
from qkd.quant.quantizer import Quantizer

FilterFn = Callable[[nn.Module, str], bool]
log = logging.getLogger("qkd")

LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
# Why a layer is left float (what quantization_summary shows after "float: ").
FILTERED = "excluded by filter_fn"
READ_DIRECTLY = "nn.MultiheadAttention reads its weight directly, not through its forward"
MODEL_ITSELF = "(the model itself)"  # how a model that computes with its own weights is named
ONLY_MODULES = "qkd quantizes nn.Conv2d/nn.Linear modules"
# Modules whose parameters are no matmul/conv weights (scales, lookup tables): never a layer left float.
NOT_MATMUL = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.Embedding, nn.EmbeddingBag)
_CHILD_WEIGHT = re.compile(r"\bself\.(\w+)\.weight\b(?!\s*\.)")  # not .weight.dtype, .weight.shape
_FUNCTIONAL = re.compile(r"\b(?:F|functional|torch)\.(conv_transpose[123]d|conv[123]d|linear|bilinear)\s*\(")


def is_layer_like(module: nn.Module) -> bool:
    """A Conv (1-3d, transposed too) or Linear layer, of any subclass, quantized or not."""
    return isinstance(module, LAYER_TYPES)


def own_weight_modules(model: nn.Module) -> list[tuple[str, str]]:
    """``(name, why)`` of every module that computes with a weight of its own (``F.conv2d(x, self.weight)``,
    ``F.linear``, ``nn.MultiheadAttention``'s input projection) rather than through a Conv/Linear layer: qkd
    cannot quantize it, so it stays float. Normalisation layers and embeddings are not such modules."""
    if is_layer_like(model):
        return []
    found, inside = [], None
    for name, module in model.named_modules():  # depth first: a layer's submodules follow it
        if inside is not None and name.startswith(inside):
            continue  # a quantized layer's quantizers and parametrizations
        if is_layer_like(module):
            inside = f"{name}."
            continue
        why = _own_weight_reason(module)
        if why is not None:
            found.append((name, why))
    return found


def _own_weight_reason(module: nn.Module) -> str | None:
    if isinstance(module, (*NOT_MATMUL, Quantizer)):
        return None
    weights = [n for n, p in module._parameters.items() if p is not None and p.dim() >= 2]
    if not weights:
        return None
    calls = _functional_calls(type(module))
    if calls:
        return f"computes with {', '.join(calls)} on its own parameters; {ONLY_MODULES}"
    named = [n for n in weights if "weight" in n.lower() or "kernel" in n.lower()]
    return f"uses its own parameter '{named[0]}' directly; {ONLY_MODULES}" if named else None


@functools.cache
def _functional_calls(cls: type[nn.Module]) -> list[str]:
    """The conv/linear functions the source of ``cls`` calls (``F.conv2d``, ...); none where it has no source."""
    found = set()
    for c in cls.__mro__[: cls.__mro__.index(nn.Module)]:  # its own class and the user's bases
        try:
            found.update(_FUNCTIONAL.findall(inspect.getsource(c)))
        except (OSError, TypeError):
            pass
    return [f"F.{name}" for name in sorted(found)]


def default_filter(module: nn.Module, name: str) -> bool:
    """Select every Conv/Linear-like layer (any ``_ConvNd`` or ``nn.Linear``, subclasses included)."""
    return is_layer_like(module)


@dataclass(frozen=True)
class _Step:
    """What quantize_model does with one layer: swap it, quantize it in place, or leave it float."""

    name: str
    module: nn.Module
    swap_to: type[nn.Module] | None = None
    float_reason: str | None = None


def quantize_model(
    model: nn.Module,
    config: QuantConfig | None = None,
    filter_fn: FilterFn = default_filter,
    reconfigure: bool = False,
) -> nn.Module:
    """Quantize every Conv/Linear-like layer ``filter_fn`` selects, in place, and return ``model``.

    First and last layers are taken among the selected ones in module registration order, which is
    execution order for the usual Sequential/ResNet definitions. A model that already holds quantized
    layers is refused unless ``reconfigure=True``: then it is dequantized and quantized again with
    ``config`` (weights kept, quantizers re-initialised from the weights; activation quantizers on the
    next batch). Layers left float for a reason other than ``first_last_bits`` are logged as warnings.
    """
    config = config or QuantConfig()
    if config.budget is not None:
        raise QKDError("quantize_model takes each layer's bits, not a budget: qkd.fit chooses them within one, or "
                       "qkd.quant.budget (plan_budget, choose_bits, assigned) does for your own loop")  # fmt: skip
    if is_layer_like(model):
        raise QKDError(f"quantize_model needs a model holding layers, not one {type(model).__name__}: wrap it first")
    _dequantize_for_reconfigure(model, reconfigure)
    swap_attention(model)  # attention projections called as Linear layers, which then quantize
    _check_overrides(config, [n for n, m in model.named_modules() if n and is_layer_like(m)])
    read = read_by_parent(model)
    steps = [_plan(n, m, filter_fn, read.get(n)) for n, m in model.named_modules() if n and is_layer_like(m)]
    selected = [s.name for s in steps if s.float_reason is None]
    edges = {selected[0], selected[-1]} if selected else set()
    left_float = []
    for step in steps:
        layer, reason = step.module, step.float_reason
        if reason is None:
            wb, ab, why = config.resolve(step.name, step.name in edges)
            layer = _quantize_layer(model, step, *config.specs(wb, ab))
            reason = why if wb is None and ab is None else None
        if reason is not None:
            setattr(layer, FLOAT_REASON, reason)
            left_float.append((step.name, reason))
    _warn_float(left_float + [(n or MODEL_ITSELF, why) for n, why in own_weight_modules(model)])
    return model


def _check_overrides(config: QuantConfig, names: list[str]) -> None:
    """Refuse an override pattern that matches no layer: a typo would otherwise change nothing."""
    for pattern in config.overrides:
        if not any(matches(n, pattern) for n in names):
            near = difflib.get_close_matches(pattern, names, n=4, cutoff=0.3) or names[:4]
            raise QKDError(
                f"override pattern '{pattern}' matches no Conv/Linear layer; layers are named like {', '.join(near)}"
            )


def _dequantize_for_reconfigure(model: nn.Module, reconfigure: bool) -> None:
    done = [n for n, _ in quantized_layers(model)]
    if done and not reconfigure:
        raise QKDError(
            f"model already quantized ({len(done)} layers, e.g. '{done[0]}'); "
            "call dequantize_model first or pass reconfigure=True"
        )
    dequantize_model(model)  # also forgets the float reasons of the last quantization


def read_by_parent(model: nn.Module) -> dict[str, str]:
    """``{layer name: why}`` of the Conv/Linear layers whose parent's forward reads their weight itself
    (``F.linear(x, self.qkv.weight)``) instead of calling them: quantized, they would never run."""
    found = {}
    for name, module in model.named_modules():
        children = {c for c, m in module.named_children() if is_layer_like(m)}
        for child in children & set(_weights_read(type(module))):
            full = f"{name}.{child}" if name else child
            found[full] = f"{type(module).__name__}.forward reads self.{child}.weight directly, not through its forward"
    return found


@functools.cache
def _weights_read(cls: type[nn.Module]) -> list[str]:
    """The children whose ``.weight`` the forward of ``cls`` reads (``self.<child>.weight``)."""
    try:
        return _CHILD_WEIGHT.findall(inspect.getsource(cls.forward))
    except (OSError, TypeError):
        return []


def _plan(name: str, module: nn.Module, filter_fn: FilterFn, read_by: str | None = None) -> _Step:
    """How to quantize one layer; QKDError for a selected layer that cannot be quantized. ``read_by``: why its
    parent reads its weight directly (it then stays float)."""
    if not filter_fn(module, name):
        return _Step(name, module, float_reason=FILTERED)
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return _Step(name, module, float_reason=READ_DIRECTLY)
    if read_by is not None:
        return _Step(name, module, float_reason=read_by)
    swap_to = next((q for base, q in QUANT_MODULES.items() if _behaves_as(module, base)), None)
    why_not = _unquantizable(module, in_place=swap_to is None)
    if why_not:
        kind = type(module).__name__
        raise QKDError(f"cannot quantize layer '{name}' ({kind}): {why_not}; exclude it with filter_fn")
    return _Step(name, module, swap_to=swap_to)


@functools.cache
def _plain_attributes(base: type[nn.Module]) -> frozenset[str]:
    """The instance attributes of a plain ``base`` layer."""
    layer = nn.Conv2d(1, 1, 1) if base is nn.Conv2d else nn.Linear(1, 1)
    return frozenset(vars(layer)) | {FLOAT_REASON}


def _behaves_as(module: nn.Module, base: type[nn.Module]) -> bool:
    """``module`` is a ``base``, or a subclass with ``base``'s forward and no state of its own (only
    its initialisation differs): its swapped form then loses nothing."""
    cls = type(module)
    if cls is base:
        return True
    same_code = all(getattr(cls, f, None) is getattr(base, f, None) for f in ("forward", "_conv_forward"))
    same_state = set(module._parameters) <= {"weight", "bias"} and not module._buffers and not module._modules
    return isinstance(module, base) and same_code and same_state and set(vars(module)) <= _plain_attributes(base)


def _unquantizable(module: nn.Module, in_place: bool) -> str | None:
    """Why ``module`` cannot be quantized (swapped, or in place when ``in_place``), or None."""
    weight = module._parameters.get("weight")
    if parametrize.is_parametrized(module):
        return "it already has parametrizations (e.g. weight_norm)"
    if not isinstance(weight, nn.Parameter):
        return "its weight is not a Parameter"
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return "its weight is not materialised yet (a lazy layer): run one batch first"
    if in_place and not _takes_input_first(type(module).forward):
        return "its forward does not take the input as its first positional argument"
    return None


def _takes_input_first(forward: Callable) -> bool:
    params = list(inspect.signature(forward).parameters.values())[1:]  # after self
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return bool(params) and params[0].kind in (*positional, inspect.Parameter.VAR_POSITIONAL)


def _quantize_layer(model: nn.Module, step: _Step, weight_spec: QuantSpec, act_spec: QuantSpec) -> nn.Module:
    if step.swap_to is None:
        return quantize_in_place(step.module, weight_spec, act_spec)
    layer = step.swap_to.from_float(step.module, weight_spec, act_spec)
    _set_submodule(model, step.name, layer)
    return layer


def _warn_float(left_float: list[tuple[str, str]]) -> None:
    """One warning per reason for layers left float, except those the first/last rule keeps float."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name, reason in left_float:
        if reason != EDGE:
            groups[reason].append(name)
    for reason, names in groups.items():
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        log.warning("quantize_model: %d layer(s) left float (%s): %s%s", len(names), reason, ", ".join(names[:5]), more)


def dequantize_model(model: nn.Module) -> nn.Module:
    """Undo :func:`quantize_model`, in place: float layers of the original classes, same parameters."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLayer):
            dequantize_in_place(module)
        elif isinstance(module, SWAPPED):
            _set_submodule(model, name, module.to_float())
        module.__dict__.pop(FLOAT_REASON, None)
    return restore_attention(model)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every quantized layer of ``model`` (swapped or in place) with its qualified name."""
    return ((n, m) for n, m in model.named_modules() if is_quantized_layer(m))


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
