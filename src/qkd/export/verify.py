"""The checker: an export against the model it came from, on real images.

:func:`float64_reference` is the exact answer an export is held to (the fake-quant model in float64, with the
model's own integer codes); :func:`compare` gives the top-1 agreement and the largest logit difference of any
callable (an exported file's runner, the int runtime) against the model and that reference.

>>> runtime, _ = load_int("student-int.safetensors")
>>> compare(runtime, student, test_loader, limit=1000, exact=True)["agreement_f64"]
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from functools import partial

import torch
from torch import Tensor, nn

from qkd.export.formats import check_limit
from qkd.export.grid import float_weight, grid, weight_layers
from qkd.quant import Quantizer, quantizers


def float64_reference(model: nn.Module) -> nn.Module:
    """A float64 copy of the fake-quant ``model``: the exact answer an export is held to.

    Two roundings stay those of ``model``, as every export has them: the weights' integer codes (quantized
    once, with the float32 maths the network was trained with) and the codes of the network's float32
    input where a layer quantizes it directly (its float32 division by the step). Redoing either in
    float64 moves a value lying on a rounding boundary (about one in 2**24, so a few pixels of a batch
    of 8-bit inputs) by a step, which is no difference of the export. Everything after them, every
    activation between layers, is quantized in float64.
    """
    model64 = copy.deepcopy(model).double()
    layers = weight_layers(model)
    with torch.no_grad():  # float32 fake-quantized weights, which the float64 quantizers map to the same codes
        for name, layer in layers:
            if layer.weight_quant.active:
                float_weight(model64.get_submodule(name)).copy_(layer.weight_quant(float_weight(layer)).double())
    seen: dict[str, Tensor] = {}
    model64.register_forward_pre_hook(lambda _, args: seen.update(input=args[0] if args else None))
    float32 = dict(quantizers(model))
    for name, q64 in quantizers(model64):
        q64.register_forward_hook(partial(_input_codes_in_float32, name, float32[name], seen))
    return model64


def _input_codes_in_float32(
    name: str, q32: Quantizer, seen: dict, q64: Quantizer, args: tuple, out: Tensor
) -> Tensor | None:
    """Forward hook: where ``q64`` quantizes the network's input itself, the codes of the float32 quantizer."""
    x = args[0]
    if x is not seen.get("input") or not q64.active:
        return None
    g = grid(name, q32)
    return g.values(g.codes(x.float()))


def compare(
    exported: Callable[[Tensor], Tensor],
    model: Callable[[Tensor], Tensor],
    batches: Iterable,
    limit: int | None = None,
    exact: bool = False,
) -> dict:
    """Top-1 agreement and max |logit difference| between ``exported`` and the fake-quant ``model``
    (a module, or any callable giving its logits), and both accuracies, over ``batches`` (at most
    ``limit`` images, from batches spread evenly over ``batches`` where its length is known). ``exact``
    (``model`` a module) adds ``agreement_f64`` and ``max_logit_diff_f64``: the same against ``model``
    evaluated in float64 (see :func:`float64_reference`), its exact answer, which float32 rounding can move
    across a quantization step (the float32 figures then count that rounding too)."""
    check_limit(limit, "limit")
    if isinstance(model, nn.Module):
        model = model.eval().cpu()
        model64 = float64_reference(model) if exact else None
    elif exact:
        raise TypeError("exact=True needs the model as a module")
    seen = agree = agree64 = right_export = right_model = 0
    max_diff = max_diff64 = 0.0
    stride = None  # with a limit and batches of known number, every stride-th batch: spread over the whole split
    with torch.no_grad():
        for i, (x, y) in enumerate(batches):
            if stride is None:
                known = limit is not None and hasattr(batches, "__len__")
                stride = max(1, len(batches) // math.ceil(limit / len(y))) if known else 1
            if i % stride:
                continue  # a split stored by class would otherwise be checked on its first classes only
            x, y = x.cpu().contiguous(), y.cpu()
            if limit is not None:
                x, y = x[: limit - seen], y[: limit - seen]
            ref, out = model(x), torch.as_tensor(exported(x))
            agree += int((ref.argmax(1) == out.argmax(1)).sum())
            right_export += int((out.argmax(1) == y).sum())
            right_model += int((ref.argmax(1) == y).sum())
            max_diff = max(max_diff, float((ref - out.float()).abs().max()))
            if exact:
                ref64 = model64(x.double())
                agree64 += int((ref64.argmax(1) == out.argmax(1)).sum())
                max_diff64 = max(max_diff64, float((ref64 - out.double()).abs().max()))
            seen += len(y)
            if limit is not None and seen >= limit:
                break
    # export_acc: the exported model's top-1 (engine_acc, its old name, kept for readers of older results)
    result = {"images": seen, "agreement": agree / seen, "max_logit_diff": max_diff, "export_acc": right_export / seen,
              "engine_acc": right_export / seen, "fake_quant_acc": right_model / seen}  # fmt: skip
    if exact:
        result.update(agreement_f64=agree64 / seen, max_logit_diff_f64=max_diff64)
    return result


def check_split(data) -> tuple[str, Iterable]:
    """The images an export is checked on: the test split, or validation where a data factory gives no test."""
    return ("test", data.test) if data.test is not None else ("validation", data.val)
