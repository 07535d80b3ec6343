"""Mixed precision within a budget: each layer's bits chosen to meet a size or cost limit with the least loss.

A layer's sensitivity at width ``b`` is the increase of the task loss on a few calibration batches when that layer
alone is quantized at W b A b (every other layer float; its quantizers initialised from the first batch, as
:func:`~qkd.quant.convert.calibrate` does). The allocation is the exact solution of the multiple-choice knapsack:
the least total sensitivity whose cost is within the budget (:func:`allocate`). Layers the first/last rule or an
override sets keep their bits; their cost counts in the total.

>>> plan = plan_budget(model, quant, example=x[:1])            # costs; refuses a budget no allocation can meet
>>> result = choose_bits(model, quant, plan, batches, F.cross_entropy)
>>> quantize_model(model, assigned(quant, result["bits"]))
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from qkd.errors import QKDError
from qkd.quant.config import Budget, QuantConfig, matches
from qkd.quant.convert import quantization_disabled, quantize_model, quantized_layers, set_quantization

FLOAT_BITS = 32  # what a float side counts in a budget
SENSITIVITY_BATCHES = 2  # calibration batches the loss is measured on, per layer and width


@dataclass
class BudgetPlan:
    """A model's costs under ``budget``: per allocated layer, the cost at each of ``budget.bits``; the fixed layers'
    bits and their total cost; the float cost of every layer (the largest budget that makes sense)."""

    budget: Budget
    allocated: dict[str, list[int]]
    fixed: dict[str, tuple[int | None, int | None]]
    fixed_cost: int
    float_cost: int

    @property
    def smallest(self) -> int:
        return self.fixed_cost + sum(min(c) for c in self.allocated.values())

    @property
    def largest(self) -> int:
        return self.fixed_cost + sum(max(c) for c in self.allocated.values())


def layer_cost(budget: Budget, layer: nn.Module, macs: int, weight_bits: int | None, act_bits: int | None) -> int:
    """Bytes of ``layer``'s packed weight codes, or its bit operations per image (float sides at 32 bits)."""
    wb, ab = weight_bits or FLOAT_BITS, act_bits or FLOAT_BITS
    if budget.unit == "weights":
        return math.ceil(layer.weight.numel() * wb / 8)
    return macs * wb * ab


@torch.no_grad()
def count_macs(model: nn.Module, example: Tensor) -> dict[str, int]:
    """Multiply-accumulates per image of each quantized layer of ``model`` (one forward pass of ``example``,
    one image, quantization off), summed over the layer's calls."""
    macs, hooks = {}, []
    for name, layer in quantized_layers(model):
        macs[name] = 0

        def hook(m: nn.Module, inputs: tuple, out: Tensor, name: str = name) -> None:
            transposed = getattr(m, "transposed", False)  # ConvTranspose: each input element meets weight[0]
            touched = inputs[0] if transposed else out
            macs[name] += touched.numel() * m.weight[0].numel()

        hooks.append(layer.register_forward_hook(hook))
    was_training = model.training
    try:
        with quantization_disabled(model):
            model.eval()
            model(example[:1])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return macs


def plan_budget(model: nn.Module, quant: QuantConfig, example: Tensor | None = None) -> BudgetPlan:
    """The costs of ``model``'s layers under ``quant.budget`` (``example``: an input batch, needed for ``bops``);
    QKDError, before anything is written, where the budget is below the smallest allocation or above float size."""
    budget = quant.budget
    probe = quantize_model(copy.deepcopy(model), replace(quant, budget=None))
    layers = dict(quantized_layers(probe))
    if budget.unit == "bops" and example is None:
        raise QKDError("a bops budget needs an example input to count the layers' operations")
    macs = count_macs(probe, example) if budget.unit == "bops" else dict.fromkeys(layers, 0)
    names = list(layers)
    edges = {names[0], names[-1]} if names and quant.first_last_bits != "same" else set()
    allocated, fixed, fixed_cost = {}, {}, 0
    for name, layer in layers.items():
        if name in edges or any(matches(name, p) for p in quant.overrides):
            fixed[name] = (layer.weight_quant.bits, layer.act_quant.bits)
            fixed_cost += layer_cost(budget, layer, macs[name], *fixed[name])
        else:
            allocated[name] = [layer_cost(budget, layer, macs[name], b, b) for b in budget.bits]
    float_cost = sum(layer_cost(budget, m, macs[n], None, None) for n, m in layers.items())
    plan = BudgetPlan(budget, allocated, fixed, fixed_cost, float_cost)
    _check_within(plan)
    return plan


def _check_within(plan: BudgetPlan) -> None:
    b = plan.budget
    given = f"quant.budget.{b.unit}={b.weights if b.unit == 'weights' else b.bops}"
    fmt = b.format
    span = (f"with bits {b.bits} this model's {'weight size' if b.unit == 'weights' else 'cost'} is from "
            f"{fmt(plan.smallest)} (all at {b.bits[0]} bits) to {fmt(plan.largest)} (all at {b.bits[-1]} bits), "
            f"{fmt(plan.float_cost)} in float")  # fmt: skip
    if not plan.allocated:
        raise QKDError(f"{given}: no layer is left to allocate (the first/last rule and quant.overrides set them all)")
    if b.limit < plan.smallest:
        raise QKDError(f"{given} ({fmt(b.limit)}) is below what these bits can meet: {span}; give a budget in that "
                       "range or add smaller quant.budget.bits")  # fmt: skip
    if b.limit > plan.float_cost:
        raise QKDError(f"{given} ({fmt(b.limit)}) is above the float model's: {span}; give a budget in that range")


def allocate(costs: Sequence[Sequence[int]], sensitivity: Sequence[Sequence[float]], limit: int) -> list[int] | None:
    """The choice per layer (an index into its options) of least total ``sensitivity`` whose total cost is at most
    ``limit``; None where none is. Exact: the Pareto front of (cost, sensitivity) over the layers so far, pruned
    of what cannot fit with the cheapest remaining choices."""
    rest = [0] * (len(costs) + 1)
    for i in range(len(costs) - 1, -1, -1):
        rest[i] = rest[i + 1] + min(costs[i])
    front: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    for i, (row_c, row_s) in enumerate(zip(costs, sensitivity)):
        options = sorted((c + ci, s + si, chosen + (j,)) for c, s, chosen in front
                         for j, (ci, si) in enumerate(zip(row_c, row_s)) if c + ci + rest[i + 1] <= limit)  # fmt: skip
        front = []
        for option in options:  # by cost: keep one only where it is better than every cheaper one
            if not front or option[1] < front[-1][1]:
                front.append(option)
    return list(front[-1][2]) if front else None


@torch.no_grad()
def sensitivities(model: nn.Module, quant: QuantConfig, names: list[str], batches: list[tuple[Tensor, Tensor]],
                  loss_fn: Callable[[Tensor, Tensor], Tensor]) -> dict[str, list[float]]:  # fmt: skip
    """Per layer in ``names``: the loss increase on ``batches`` with that layer alone at each width of
    ``quant.budget.bits`` (the others float), its quantizers initialised from the first batch."""

    def loss(m: nn.Module) -> float:
        return sum(loss_fn(m(x), y).item() for x, y in batches) / len(batches)

    was_training = model.training
    model.eval()
    base = loss(model)
    model.train(was_training)
    found = {n: [] for n in names}
    for b in quant.budget.bits:
        at_b = replace(quant, budget=None, overrides={}, weight_bits=b, act_bits=b, first_last_bits="same")
        probe = quantize_model(copy.deepcopy(model), at_b).eval()
        set_quantization(probe, False)
        layers = [probe.get_submodule(n) for n in names]
        _initialise_inputs(probe, layers, batches[0][0])
        for name, layer in zip(names, layers):
            set_quantization(layer, True)
            found[name].append(loss(probe) - base)
            set_quantization(layer, False)
    return found


def _initialise_inputs(probe: nn.Module, layers: list[nn.Module], x: Tensor) -> None:
    """Initialise each of ``layers``' input quantizers from its float input, in one pass of ``x`` with every
    quantizer off: what :func:`~qkd.quant.convert.calibrate` does with that layer's quantizers alone on."""

    def hook(layer: nn.Module, args: tuple) -> None:
        layer.act_quant.enabled = True
        layer.act_quant(args[0])  # initialises it on its first input
        layer.act_quant.enabled = False

    hooks = [layer.register_forward_pre_hook(hook) for layer in layers]
    try:
        probe(x)
    finally:
        for h in hooks:
            h.remove()


def choose_bits(model: nn.Module, quant: QuantConfig, plan: BudgetPlan, batches: list[tuple[Tensor, Tensor]],
                loss_fn: Callable[[Tensor, Tensor], Tensor]) -> dict:  # fmt: skip
    """The allocation of ``plan``'s layers: ``{unit, limit, achieved, smallest, largest, float, bits, fixed,
    sensitivity}`` (JSON-ready; ``bits``: the width of every allocated layer)."""
    names, b = list(plan.allocated), plan.budget
    sens = sensitivities(model, quant, names, batches, loss_fn)
    chosen = allocate([plan.allocated[n] for n in names], [sens[n] for n in names], b.limit - plan.fixed_cost)
    if chosen is None:  # plan_budget refused this already
        raise QKDError(f"no allocation meets quant.budget.{b.unit}: {b.format(b.limit)}")
    achieved = plan.fixed_cost + sum(plan.allocated[n][j] for n, j in zip(names, chosen))
    return {
        "unit": b.unit,
        "limit": b.limit,
        "achieved": achieved,
        "smallest": plan.smallest,
        "largest": plan.largest,
        "float": plan.float_cost,
        "bits": {n: b.bits[j] for n, j in zip(names, chosen)},
        "fixed": {n: list(wa) for n, wa in plan.fixed.items()},
        "sensitivity": {n: dict(zip(map(str, b.bits), sens[n])) for n in names},
    }


def assigned(quant: QuantConfig, bits: dict[str, int]) -> QuantConfig:
    """``quant`` with the chosen ``bits`` as per-layer overrides (the user's overrides still last), no budget."""
    chosen = {name: {"weight_bits": b, "act_bits": b} for name, b in bits.items()}
    return replace(quant, budget=None, overrides={**chosen, **quant.overrides})


def describe(result: dict, budget: Budget) -> str:
    """One line: the achieved total against the budget, and the layers per width."""
    counts = {b: sum(v == b for v in result["bits"].values()) for b in budget.bits}
    per = ", ".join(f"{n} at {b}" for b, n in counts.items() if n)
    what = "weights" if budget.unit == "weights" else "BOPs"
    achieved, limit = budget.format(result["achieved"]), budget.format(result["limit"])
    return f"budget: {what} {achieved} of {limit} (allocated layers W b A b: {per})"
