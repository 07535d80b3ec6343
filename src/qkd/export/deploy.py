"""Export a trained student and check the export against it: the glue behind ``qkd export`` / ``qkd eval --engine``.

Every export is verified at once: the exported model's top-1 predictions are compared with the
fake-quant model's on real images, and the agreement and largest logit difference are reported.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from qkd.errors import QKDError
from qkd.export.intfile import load_int, save_int
from qkd.export.intgraph import to_int_program
from qkd.quant import Quantizer, dequantize_model, is_quantized, quantizers

# format -> file extension: packed integers; ONNX with QDQ nodes; ONNX with integer convolutions
EXTENSIONS = {"int": "safetensors", "onnx": "onnx", "onnx-int": "onnx"}
FORMATS = tuple(EXTENSIONS)


def float_checkpoint_bytes(student: nn.Module) -> int:
    """Size of the same network saved as a plain float32 state dict (the usual checkpoint)."""
    plain = dequantize_model(copy.deepcopy(student).cpu())
    buf = io.BytesIO()
    torch.save(plain.state_dict(), buf)
    return buf.tell()


def _float_weight(layer: nn.Module) -> nn.Parameter:
    """A quantized layer's float weight: the parameter its weight quantizer reads (swapped or in place)."""
    return layer.parametrizations.weight.original if hasattr(layer, "parametrizations") else layer.weight


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
    layers = [(name, m) for name, m in model.named_modules() if isinstance(getattr(m, "weight_quant", None), Quantizer)]
    with torch.no_grad():  # float32 fake-quantized weights, which the float64 quantizers map to the same codes
        for name, layer in layers:
            if layer.weight_quant.active:
                _float_weight(model64.get_submodule(name)).copy_(layer.weight_quant(_float_weight(layer)).double())
    seen: dict[str, Tensor] = {}
    model64.register_forward_pre_hook(lambda _, args: seen.update(input=args[0] if args else None))
    float32 = dict(quantizers(model))
    for name, q64 in quantizers(model64):
        q64.register_forward_hook(partial(_input_codes_in_float32, float32[name], seen))
    return model64


def _input_codes_in_float32(q32: Quantizer, seen: dict, q64: Quantizer, args: tuple, out: Tensor) -> Tensor | None:
    """Forward hook: where ``q64`` quantizes the network's input itself, the codes of the float32 quantizer."""
    x = args[0]
    if x is not seen.get("input") or not q64.active:
        return None
    step, offset, qn, qp = (t.double() if isinstance(t, Tensor) else t for t in q32.affine())
    codes = torch.clamp(torch.round((q32(x.float()).double() - offset) / step), qn, qp)
    return offset + step * codes


def compare(
    engine: Callable[[Tensor], Tensor],
    model: Callable[[Tensor], Tensor],
    batches: Iterable,
    limit: int | None = None,
    exact: bool = False,
) -> dict:
    """Top-1 agreement and max |logit difference| between ``engine`` and the fake-quant ``model``
    (a module, or any callable giving its logits), and both accuracies, over ``batches`` (at most
    ``limit`` images). ``exact`` (``model`` a module) adds ``agreement_f64`` and ``max_logit_diff_f64``:
    the same against ``model`` evaluated in float64 (see :func:`float64_reference`), its exact answer,
    which float32 rounding can move across a quantization step (the float32 figures then count that
    rounding too)."""
    if isinstance(model, nn.Module):
        model = model.eval().cpu()
        model64 = float64_reference(model) if exact else None
    elif exact:
        raise TypeError("exact=True needs the model as a module")
    seen = agree = agree64 = right_engine = right_model = 0
    max_diff = max_diff64 = 0.0
    with torch.no_grad():
        for x, y in batches:
            x, y = x.cpu().contiguous(), y.cpu()
            if limit is not None:
                x, y = x[: limit - seen], y[: limit - seen]
            ref, out = model(x), torch.as_tensor(engine(x))
            agree += int((ref.argmax(1) == out.argmax(1)).sum())
            right_engine += int((out.argmax(1) == y).sum())
            right_model += int((ref.argmax(1) == y).sum())
            max_diff = max(max_diff, float((ref - out.float()).abs().max()))
            if exact:
                ref64 = model64(x.double())
                agree64 += int((ref64.argmax(1) == out.argmax(1)).sum())
                max_diff64 = max(max_diff64, float((ref64 - out.double()).abs().max()))
            seen += len(y)
            if limit is not None and seen >= limit:
                break
    result = {"images": seen, "agreement": agree / seen, "max_logit_diff": max_diff,
              "engine_acc": right_engine / seen, "fake_quant_acc": right_model / seen}  # fmt: skip
    if exact:
        result.update(agreement_f64=agree64 / seen, max_logit_diff_f64=max_diff64)
    return result


def export_student(student: nn.Module, fmt: str, path: Path, example: Tensor, info: dict) -> Callable[[Tensor], Tensor]:
    """Write ``student`` in ``fmt`` to ``path``; return a callable that runs the written file."""
    if fmt not in FORMATS:
        raise QKDError(f"unknown export format '{fmt}'; valid formats: {', '.join(FORMATS)}")
    if not is_quantized(student):
        raise QKDError("the model has no quantized layers; export the student of a quantized run")
    student = student.eval().cpu()
    if fmt == "int":
        ops, tensors = to_int_program(student, example.cpu())
        save_int(path, ops, tensors, info)
        return load_int(path)[0]
    from qkd.export.onnx import export_onnx, onnx_runner

    if fmt == "onnx":
        export_onnx(student, example.cpu(), path)
    else:
        from qkd.export.onnx_int import export_onnx_int

        export_onnx_int(student, example.cpu(), path)
    run = onnx_runner(path)  # one session for every batch
    return lambda x: torch.from_numpy(run(x.numpy()))
