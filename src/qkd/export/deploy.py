"""Export a trained student and check the export against it, and evaluate an exported file: the glue behind
``qkd export`` and ``qkd eval``.

Every export is verified at once: the exported model's top-1 predictions are compared with the
fake-quant model's on real images, and the agreement and largest logit difference are reported.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from qkd.config import where_settings
from qkd.errors import QKDError
from qkd.export.contract import (
    PIXEL_MAX,
    complete,
    is_safetensors,
    preprocess,
    raw_from_input,
    read_onnx_contract,
    run_contract,
)
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


def export_student(
    student: nn.Module, fmt: str, path: Path, example: Tensor, info: dict, bake_preprocessing: bool = False
) -> Callable[[Tensor], Tensor]:
    """Write ``student`` in ``fmt`` to ``path``; return a callable that runs the written file on the network's
    input (the normalised images, also for a file that takes raw pixels).

    ``info`` goes into the file as the start of its input contract (:mod:`qkd.export.contract`): a run's
    :func:`~qkd.export.contract.run_contract`, :func:`~qkd.export.contract.input_contract` for your own data, or
    ``{}``; the file adds its format, input shape and the qkd version. ``bake_preprocessing`` (ONNX formats):
    the file takes raw pixel values and normalises them in its graph."""
    return _export(student, fmt, path, example, info, bake_preprocessing)[0]


def _export(student: nn.Module, fmt: str, path: Path, example: Tensor, info: dict,
            bake_preprocessing: bool) -> tuple[Callable[[Tensor], Tensor], dict]:  # fmt: skip
    """:func:`export_student`, also returning the contract written into the file."""
    check_format(fmt, bake_preprocessing)
    if not is_quantized(student):
        raise QKDError("the model has no quantized layers; export the student of a quantized run")
    student, example = student.eval().cpu(), example.cpu()
    contract = complete(info, fmt, example, bake_preprocessing)
    if fmt == "int":
        ops, tensors = to_int_program(student, example)
        save_int(path, ops, tensors, contract)
        return load_int(path)[0], contract
    from qkd.export.onnx import export_onnx, onnx_runner

    if fmt == "onnx":
        export_onnx(student, example, path, contract=contract)
    else:
        from qkd.export.onnx_int import export_onnx_int

        export_onnx_int(student, example, path, contract=contract)
    run = onnx_runner(path)  # one session for every batch
    if not bake_preprocessing:
        return (lambda x: torch.from_numpy(run(x.numpy()))), contract
    mean, std, pixel_max = contract["mean"], contract["std"], contract["pixel_max"]
    return (lambda x: torch.from_numpy(run(raw_from_input(x, mean, std, pixel_max).numpy()))), contract


def check_format(fmt: str, bake_preprocessing: bool = False) -> None:
    """A one-line :class:`QKDError` for a format that is not one, or preprocessing to bake into the int file."""
    if fmt not in FORMATS:
        raise QKDError(f"unknown export format '{fmt}'; valid formats: {', '.join(FORMATS)}")
    if bake_preprocessing and fmt == "int":
        raise QKDError("--bake-preprocessing applies to the ONNX formats (onnx, onnx-int); the int file's "
                       "manifest says the preprocessing (qkd.export.contract.preprocess applies it)")  # fmt: skip


def check_split(data) -> tuple[str, Iterable]:
    """The images an export is checked on: the test split, or validation where a data factory gives no test."""
    return ("test", data.test) if data.test is not None else ("validation", data.val)


def default_path(target: str | Path, fmt: str, baked: bool = False) -> Path:
    """``<run>/export/student-<format>[-baked].<ext>`` (beside a checkpoint file given instead of a run)."""
    target = Path(target)
    check_format(fmt, baked)
    folder = target if target.is_dir() else target.parent
    return folder / "export" / f"student-{fmt}{'-baked' if baked else ''}.{EXTENSIONS[fmt]}"


@dataclass
class Exported:
    """What :func:`export_run` wrote and how it compared with the trained model (``check``: :func:`compare`'s
    figures on ``split``)."""

    path: Path
    contract: dict
    check: dict
    split: str
    loaded: Any  # the pipeline.LoadedStudent exported


def require_quantized(loaded: Any, target: str | Path) -> None:
    if not loaded.quantized:
        raise QKDError(f"{target} holds a float student (the run did not reach a quantized stage); export a run "
                       "or checkpoint of a quantized stage")  # fmt: skip


def export_loaded(loaded: Any, fmt: str, path: str | Path, *, bake_preprocessing: bool = False,
                  verify: int | None = 1000) -> Exported:  # fmt: skip
    """Export a run's model read by ``pipeline.load_student`` with the run's contract; check it on ``verify``
    images of the test split against the trained model."""
    path = Path(path)
    split, images = check_split(loaded.data)
    contract = run_contract(loaded.cfg, loaded.data, loaded.where)
    contract["float32_bytes"] = float_checkpoint_bytes(loaded.student)  # what the export is compared with
    example = next(iter(images))[0][:2]
    run, contract = _export(loaded.student, fmt, path, example, contract, bake_preprocessing)
    check = compare(run, loaded.student, images, limit=verify, exact=True)
    return Exported(path, contract, check, split, loaded)


def export_run(
    target: str | Path,
    fmt: str = "int",
    out: str | Path | None = None,
    *,
    bake_preprocessing: bool = False,
    verify: int | None = 1000,
    unfinished: bool = False,
    overrides: list[str] | None = None,
) -> Exported:
    """``qkd export`` from Python: the student of a run folder or checkpoint file, written in ``fmt`` to ``out``
    (default :func:`default_path`) with its input contract, and checked against the trained model.

    >>> exported = export_run("runs/demo", "onnx")
    >>> exported.path, exported.check["agreement_f64"]
    """
    from qkd import pipeline
    from qkd.checkpoint import load_checkpoint

    target = Path(target)
    ckpt = load_checkpoint(target) if target.is_file() else None  # read once, for its settings and weights
    cfg = pipeline.target_config(target, [*(overrides or []), "device=cpu"], ckpt)
    loaded = pipeline.load_student(cfg, target, role="student", unfinished=unfinished, ckpt=ckpt)
    require_quantized(loaded, target)
    path = Path(out) if out is not None else default_path(target, fmt, bake_preprocessing)
    return export_loaded(loaded, fmt, path, bake_preprocessing=bake_preprocessing, verify=verify)


# ----- reading an exported file back ------------------------------------------------------------------------
def open_export(path: str | Path) -> tuple[str, dict, Callable[[Tensor], Tensor]]:
    """An exported file's format, contract and a callable running it (the int engine, or onnxruntime);
    anything that is not a qkd export is a one-line :class:`QKDError`."""
    path = Path(path)
    if not path.is_file():
        raise QKDError(f"exported file not found: {path}")
    if path.name.endswith(".safetensors.json"):
        raise QKDError(f"{path} is the manifest written beside an int export, for reading; give the export itself, "
                       f"{path.with_suffix('')}")  # fmt: skip
    if is_safetensors(path):
        engine, manifest = load_int(path)
        return "int", {k: v for k, v in manifest.items() if k != "ops"}, engine
    contract = read_onnx_contract(path)
    if contract is None:
        raise QKDError(f"{path} is an ONNX model without qkd's metadata (not exported by qkd, or by an older qkd): "
                       "export it again with qkd export")  # fmt: skip
    fmt = contract.get("export_format")
    if fmt not in ("onnx", "onnx-int"):
        raise QKDError(f"{path}: its qkd metadata names the format {fmt!r}, not onnx or onnx-int")
    from qkd.export.onnx import onnx_runner

    try:
        run = onnx_runner(path)
    except Exception as e:
        raise QKDError(f"onnxruntime cannot load {path}: {_first_line(e)}") from None
    return fmt, contract, lambda x: torch.from_numpy(run(np.asarray(x)))


#: what ``qkd eval FILE`` may change in the data settings a file carries: where the data is and how it is read
DATA_CHANGES = where_settings("data")


def evaluate_export(path: str | Path, overrides: list[str] | None = None, engine: str | None = None) -> dict:
    """Top-1 accuracy of an exported file on its run's test split (validation where there is none), the
    images prepared from raw pixels as the file's contract says. ``overrides``: ``key=value`` changes of
    :data:`DATA_CHANGES`; ``engine``: the format the caller expects the file to be (None: any)."""
    path = Path(path)
    fmt, contract, run = open_export(path)
    if engine is not None and engine != fmt:
        raise QKDError(f"{path} is an {fmt} export, not {engine}: evaluate it with --engine {fmt} or without --engine")
    data = _export_data(path, contract, overrides or [])
    pixel_max = PIXEL_MAX.get(contract["data"]["name"].strip().lower(), 255)
    split, images = check_split(data)
    right = seen = 0
    with torch.no_grad():
        for x, y in images:
            if data.mean is not None and data.std is not None:  # what the loaders normalised, back to raw pixels
                x = torch.from_numpy(preprocess(raw_from_input(x, data.mean, data.std, pixel_max).numpy(), contract,
                                                "NCHW"))  # fmt: skip
            right += int((torch.as_tensor(run(x.cpu())).argmax(1) == y.cpu()).sum())
            seen += len(y)
    return {"export_format": fmt, "split": split, "images": seen, "top1": right / max(seen, 1), "contract": contract}


def _export_data(path: Path, contract: dict, overrides: list[str]):
    """The data of the run a file was exported from, rebuilt from the settings it carries, on the CPU."""
    from qkd.config import RunConfig, build_config, with_overrides
    from qkd.pipeline import data_for

    settings = contract.get("data")
    if not isinstance(settings, dict) or "name" not in settings:
        raise QKDError(f"{path} carries no data settings (exported by export_student from Python, or by an older "
                       "qkd): evaluate it on your own data in Python")  # fmt: skip
    refused = [o for o in overrides if o.split("=", 1)[0] not in DATA_CHANGES or "=" not in o]
    if refused:
        raise QKDError(f"{path} carries its run's data settings; '{refused[0]}' is not taken (only key=value "
                       f"changes of {', '.join(DATA_CHANGES)})")  # fmt: skip
    settings = dict(settings)
    seed = settings.pop("seed", 0)
    if settings.get("decode") == "cuda":  # the run decoded on its GPU; here the nearest: the same decoders, on the CPU
        settings["decode"] = "cpu"
    cfg = build_config({**RunConfig().model_dump(mode="json"), "data": settings, "seed": seed})
    return data_for(with_overrides(cfg, overrides), "cpu")


def _first_line(e: Exception) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
