"""AdaRound (Nagel et al., ICML 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization").

Layer by layer, in the model's order, each quantized layer's weights learn whether to round up or down: the
weight in use is ``offset + scale * clamp(floor((W - offset) / scale) + h(V), qn, qp)`` on the layer's own grid
(:meth:`~qkd.quant.quantizer.Quantizer.affine`), with the rectified sigmoid ``h``; Adam on ``V`` minimises
``||float_layer(x_float) - quantized_layer(x_quant)||^2 + lambda * sum(1 - |2h(V) - 1|^beta)`` (the float model's
input against the quantized model's, the paper's asymmetric form), ``beta`` annealed from 20 to 2 after a
warm-up. At the end the float weight is set to the chosen grid values, which the layer's own weight quantizer
then reproduces exactly (checked). Activation quantizers stay as they are.

>>> report = adaround(student, float_model, images, iters=500)   # student: quantized and calibrated
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from qkd.quant.convert import quantized_layers
from qkd.quant.modules import is_generic_quantized
from qkd.quant.quantizer import Quantizer

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (the paper's values)
BETA = (20.0, 2.0)  # the rounding regulariser's exponent, annealed from the first to the second
WARMUP = 0.2  # share of the iterations with reconstruction only (no rounding regulariser)
LAMBDA = 0.01  # weight of the rounding regulariser
LR = 3e-2  # Adam on V: 500 iterations at 1e-3 leave most h(V) undecided; 3e-2 decides them (measured)
BATCH = 32  # calibration images per iteration


@dataclass
class LayerResult:
    """One layer's reconstruction error (mean squared output error on the calibration images) with nearest
    rounding and with the rounding AdaRound chose, and the share of ``h(V)`` left undecided (not within 0.01
    of 0 or 1) at the end."""

    name: str
    nearest: float
    adaround: float
    undecided: float
    flipped: float  # share of the weights rounded otherwise than to nearest
    time_s: float = 0.0


def rectified_sigmoid(v: Tensor) -> Tensor:
    """``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _weight_name(layer: nn.Module) -> str:
    """The name of the float weight ``functional_call`` replaces (in-place layers keep it in a parametrization)."""
    return "parametrizations.weight.original" if is_generic_quantized(layer) else "weight"


class _Grid:
    """A weight quantizer's grid in the layout of the float weight: ``offset + scale * code``, ``qn..qp``."""

    def __init__(self, quantizer: Quantizer, weight: Tensor) -> None:
        scale, offset, self.qn, self.qp = quantizer.affine()
        dim = quantizer.channel_dim
        # affine() is shaped for the channels in dim 0; a per-tensor grid broadcasts as it is
        self.scale = scale.float().transpose(0, dim) if scale.dim() else scale.float()
        self.offset = offset.float().transpose(0, dim) if offset.dim() else offset.float()
        self.floor = torch.floor((weight.detach() - self.offset) / self.scale)

    def values(self, up: Tensor) -> Tensor:
        """The weight on the grid for ``up`` in [0, 1] added to the floor (clamped to the grid)."""
        return self.offset + self.scale * torch.clamp(self.floor + up, self.qn, self.qp)

    def codes(self, up: Tensor) -> Tensor:
        return torch.clamp(self.floor + up, self.qn, self.qp)


def _reconstruction(out: Tensor, target: Tensor) -> Tensor:
    """Squared error summed over the output channels (dim 1), averaged over the rest."""
    return (out - target).pow(2).sum(1).mean()


def _beta(t: int, iters: int) -> float:
    start = WARMUP * iters
    progress = max(0.0, (t - start) / max(iters - start, 1))
    return BETA[1] + (BETA[0] - BETA[1]) * (1 - progress)


@torch.no_grad()
def _error(layer: nn.Module, name: str, weight: Tensor, x: Tensor, target: Tensor) -> float:
    total = sum(_reconstruction(functional_call(layer, {name: weight}, (xb,)), tb).item() * len(xb)
                for xb, tb in zip(x.split(256), target.split(256)))  # fmt: skip
    return total / len(x)


def round_layer(layer: nn.Module, x: Tensor, target: Tensor, iters: int, lam: float = LAMBDA,
                batch: int = BATCH, name: str = "") -> LayerResult:  # fmt: skip
    """AdaRound one quantized layer: ``x`` its (quantized model's) inputs, ``target`` the float layer's outputs
    on the float model's inputs. Sets the layer's float weight to the chosen grid values; returns the errors."""
    quantizer, wname = layer.weight_quant, _weight_name(layer)
    weight = layer.get_parameter(wname)
    grid = _Grid(quantizer, weight)
    rest = ((weight.detach() - grid.offset) / grid.scale - grid.floor).clamp(0.01, 0.99)
    v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_()  # h(v) = rest: starts at W
    opt = torch.optim.Adam([v], lr=LR)
    with torch.no_grad():  # the input quantizer is fixed: its codes once, not at every step (nor its gradient)
        x = torch.cat([layer.act_quant(xb) for xb in x.split(256)])
    quantizers = (quantizer, layer.act_quant)
    was_enabled = [q.enabled for q in quantizers]
    for q in quantizers:  # the grid values and the quantized input go in as they are
        q.enabled = False
    try:
        nearest = _error(layer, wname, grid.values(torch.round(rest)), x, target)
        gen = torch.Generator().manual_seed(0)
        for t in range(iters):
            idx = torch.randint(len(x), (min(batch, len(x)),), generator=gen).to(x.device)
            h = rectified_sigmoid(v)
            loss = _reconstruction(functional_call(layer, {wname: grid.values(h)}, (x[idx],)), target[idx])
            if t >= WARMUP * iters:
                loss = loss + lam * (1 - (2 * h - 1).abs().pow(_beta(t, iters))).sum()
            opt.zero_grad(set_to_none=True)
            (grad,) = torch.autograd.grad(loss, [v])
            v.grad = grad
            opt.step()
        h = rectified_sigmoid(v.detach())
        up = (v.detach() >= 0).float()  # h(v) >= 0.5
        result = LayerResult(name, nearest, _error(layer, wname, grid.values(up), x, target),
                             float(((h > 0.01) & (h < 0.99)).float().mean()),
                             float((up != torch.round(rest)).float().mean()))  # fmt: skip
    finally:
        for q, enabled in zip(quantizers, was_enabled):
            q.enabled = enabled
    _set_weight(weight, quantizer, grid, up, name)
    return result


@torch.no_grad()
def _set_weight(weight: Tensor, quantizer: Quantizer, grid: _Grid, up: Tensor, name: str) -> None:
    """The float weight set to the chosen grid values; the layer's weight quantizer must give them back."""
    weight.copy_(grid.values(up))
    back = torch.round((quantizer(weight) - grid.offset) / grid.scale)
    if not torch.equal(back, grid.codes(up)):
        raise RuntimeError(f"AdaRound: the weight quantizer of {name or 'a layer'} does not reproduce the chosen "
                           "integers; please report this")  # fmt: skip


class _Reached(Exception):
    """Raised by a forward hook once the layer's input is captured: the rest of the network need not run."""


@torch.no_grad()
def _inputs(model: nn.Module, layer: nn.Module, images: Tensor, batch: int = 256) -> Tensor:
    """``layer``'s input over ``images`` in ``model`` (eval mode), the forward cut at that layer."""
    found = []

    def hook(_module, args):
        found.append(args[0].detach())
        raise _Reached

    handle = layer.register_forward_pre_hook(hook)
    try:
        for xb in images.split(batch):
            try:
                model(xb)
            except _Reached:
                pass
    finally:
        handle.remove()
    return torch.cat(found)


def adaround(model: nn.Module, float_model: nn.Module, images: Tensor, iters: int,
             stop: Callable[[], bool] | None = None,
             on_layer: Callable[[LayerResult], None] | None = None) -> list[LayerResult]:  # fmt: skip
    """AdaRound every quantized layer of ``model`` (quantized and calibrated, in place) whose weight is quantized,
    in order; ``float_model`` is the float network it was made from (its layers under the same names, unchanged),
    ``images`` the calibration images. ``stop()`` true ends it between layers (the rest keep nearest rounding).
    ``on_layer(result)`` sees each layer's result as it is done. Returns them all. Both models run in eval mode."""
    modes = model.training, float_model.training
    model.eval(), float_model.eval()
    results = []
    try:
        for name, layer in list(quantized_layers(model)):
            if not layer.weight_quant.active or (stop is not None and stop()):
                continue
            start, reference = time.perf_counter(), float_model.get_submodule(name)
            with torch.no_grad():
                target = torch.cat([reference(xb) for xb in _inputs(float_model, reference, images).split(256)])
            x = _inputs(model, layer, images)
            results.append(round_layer(layer, x, target, iters, name=name))
            results[-1].time_s = time.perf_counter() - start
            if on_layer is not None:
                on_layer(results[-1])
    finally:
        model.train(modes[0]), float_model.train(modes[1])
    return results


def summary(results: list[LayerResult]) -> dict:
    """What a run records: layers rounded, the mean relative error change, the undecided and flipped shares."""
    if not results:
        return {"layers": 0}
    ratio = [r.adaround / r.nearest for r in results if r.nearest > 0]
    return {"layers": len(results),
            "error_ratio": math.exp(sum(math.log(max(r, 1e-12)) for r in ratio) / len(ratio)) if ratio else None,
            "flipped": sum(r.flipped for r in results) / len(results),
            "undecided": max(r.undecided for r in results)}  # fmt: skip
