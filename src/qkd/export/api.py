"""Export a trained student in a format and check the export against it: ``qkd export`` from Python.

:func:`export_run` takes a run folder or checkpoint, :func:`export_loaded` a student read by the pipeline,
:func:`export_model` any quantized model. Every export is verified at once: the exported model's top-1
predictions are compared with the fake-quant model's on real images, and the agreement and largest logit
difference are reported (:mod:`qkd.export.verify`).
"""

from __future__ import annotations

import io
import re
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qkd.errors import QKDError
from qkd.export.contract import complete, raw_from_input, run_contract
from qkd.export.formats import EXTENSIONS, check_format, check_limit
from qkd.export.grid import check_quantized
from qkd.export.int_file import load_int, save_int
from qkd.export.trace import to_int_program
from qkd.export.verify import check_split, compare
from qkd.quant import quantizers

# format -> file extension: packed integers; ONNX with QDQ nodes; ONNX with integer convolutions
_PARAMETRIZED = re.compile(r"parametrizations\.(\w+)\.original$")  # a layer quantized in place: its float weight


def float_checkpoint_bytes(student: nn.Module) -> int:
    """Size of the same network saved as a plain float32 state dict (the usual checkpoint): ``student``'s state
    without its quantizers. Read from its state dict, not a dequantized copy: a deep copy shares the class torch
    makes for a layer quantized in place, and undoing the copy's quantization took ``weight`` off the original."""
    state, inside = student.state_dict(), tuple(f"{name}." for name, _ in quantizers(student))
    kept = [(_PARAMETRIZED.sub(r"\1", k), v.cpu()) for k, v in state.items() if not k.startswith(inside)]
    plain = OrderedDict(kept)
    plain._metadata = OrderedDict(_float_modules(state._metadata, inside))  # type: ignore[attr-defined]
    buf = io.BytesIO()
    torch.save(plain, buf)
    return buf.tell()


def _float_modules(metadata: dict, inside: tuple[str, ...]) -> list[tuple[str, Any]]:
    """A state dict's per-module versions, but those of quantizers and parametrizations."""
    kept = [k for k in metadata if not f"{k}.".startswith(inside) and "parametrizations" not in k.split(".")]
    return [(k, metadata[k]) for k in kept]


def export_model(
    model: nn.Module,
    fmt: str,
    path: str | Path,
    example: Tensor,
    info: dict | None = None,
    bake_preprocessing: bool = False,
) -> Callable[[Tensor], Tensor]:
    """Write any quantized ``model`` (``qkd.fit``'s student, one from :func:`qkd.quantize_model` after calibration
    or training, or a run's model read back) in ``fmt`` (int, onnx, onnx-int, executorch) to ``path``; return a
    callable that runs the written file on the network's input (the normalised images, also for a file that takes
    raw pixels). ``example``: one input batch (its shape is the file's).

    >>> run = qkd.export_model(result.student, "executorch", "student.pte", x[:2])
    >>> run(x).argmax(1)

    ``info`` goes into the file as the start of its input contract (:mod:`qkd.export.contract`): a run's
    :func:`~qkd.export.contract.run_contract`, :func:`~qkd.export.contract.input_contract` for your own data, or
    ``{}``; the file adds its format, input shape and the qkd version. ``bake_preprocessing`` (ONNX formats):
    the file takes raw pixel values and normalises them in its graph."""
    return _export(model, fmt, Path(path), example, dict(info or {}), bake_preprocessing)[0]


export_student = export_model  # its earlier name


def _export(student: nn.Module, fmt: str, path: Path, example: Tensor, info: dict, bake_preprocessing: bool,
            four_bit_storage: bool = False) -> tuple[Callable[[Tensor], Tensor], dict]:  # fmt: skip
    """:func:`export_model`, also returning the contract written into the file."""
    check_format(fmt, bake_preprocessing, four_bit_storage)
    check_quantized(student)
    student, example = student.eval().cpu(), example.cpu()
    contract = complete(info, fmt, example, bake_preprocessing)
    if fmt == "int":
        ops, tensors = to_int_program(student, example)
        save_int(path, ops, tensors, contract)
        return load_int(path)[0], contract
    if fmt == "executorch":  # executorch is imported when this format is asked for
        from qkd.export.executorch_pte import export_executorch, load_pte

        contract.update(export_executorch(student, example, path, contract))
        return load_pte(path)[1], contract
    from qkd.export.onnx_common import onnx_runner  # onnx is imported when an ONNX format is asked for

    if fmt == "onnx":
        from qkd.export.onnx_qdq import export_onnx

        export_onnx(student, example, path, contract=contract, four_bit_storage=four_bit_storage)
    else:
        from qkd.export.onnx_int import export_onnx_int

        export_onnx_int(student, example, path, contract=contract)
    run = onnx_runner(path)  # one session for every batch
    if not bake_preprocessing:
        return (lambda x: torch.from_numpy(run(x.numpy()))), contract
    mean, std, pixel_max = contract["mean"], contract["std"], contract["pixel_max"]
    return (lambda x: torch.from_numpy(run(raw_from_input(x, mean, std, pixel_max).numpy()))), contract


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
                  verify: int | None = 1000, four_bit_storage: bool = False) -> Exported:  # fmt: skip
    """Export a run's model read by ``pipeline.load_student`` with the run's contract; check it on ``verify``
    images of the test split against the trained model. ``four_bit_storage`` (format onnx): codes of 4 bits or
    fewer in INT4/UINT4 (see :func:`qkd.export.onnx_qdq.export_onnx`)."""
    check_limit(verify)  # before anything is written
    path = Path(path)
    split, images = check_split(loaded.data)
    contract = run_contract(loaded.cfg, loaded.data, loaded.where)
    contract["float32_bytes"] = float_checkpoint_bytes(loaded.student)  # what the export is compared with
    example = next(iter(images))[0][:2]
    run, contract = _export(loaded.student, fmt, path, example, contract, bake_preprocessing, four_bit_storage)
    check = compare(run, loaded.student, images, limit=verify, exact=True)
    return Exported(path, contract, check, split, loaded)


def compare_fresh_export(loaded: Any, fmt: str, name: str) -> dict:
    """``loaded`` (a run's model, read by :func:`qkd.trained.load_trained`) exported afresh to a temporary file
    named ``name`` in format ``fmt``, run, and compared with the model on its evaluation split: what
    ``qkd eval RUN --backend FMT`` reports."""
    with tempfile.TemporaryDirectory() as tmp:
        split, images = check_split(loaded.data)
        run = export_model(loaded.model, fmt, Path(tmp) / name, next(iter(images))[0][:2], {})
        return {"backend": fmt, "split": split, **compare(run, loaded.model, images, exact=True)}


def export_run(
    target: str | Path,
    fmt: str = "int",
    out: str | Path | None = None,
    *,
    bake_preprocessing: bool = False,
    verify: int | None = 1000,
    unfinished: bool = False,
    overrides: list[str] | None = None,
    four_bit_storage: bool = False,
) -> Exported:
    """``qkd export`` from Python: the student of a run folder or checkpoint file, written in ``fmt`` to ``out``
    (default :func:`default_path`) with its input contract, and checked against the trained model.

    >>> exported = export_run("runs/demo", "onnx")
    >>> exported.path, exported.check["agreement_f64"]
    """
    from qkd import pipeline
    from qkd.checkpoint import load_checkpoint

    check_limit(verify)  # before the run is read
    check_format(fmt, bake_preprocessing, four_bit_storage)
    target = Path(target)
    ckpt = load_checkpoint(target) if target.is_file() else None  # read once, for its settings and weights
    cfg = pipeline.target_config(target, [*(overrides or []), "device=cpu"], ckpt)
    loaded = pipeline.load_student(cfg, target, role="student", unfinished=unfinished, ckpt=ckpt)
    require_quantized(loaded, target)
    path = Path(out) if out is not None else default_path(target, fmt, bake_preprocessing)
    return export_loaded(loaded, fmt, path, bake_preprocessing=bake_preprocessing, verify=verify,
                         four_bit_storage=four_bit_storage)  # fmt: skip


def code_storage(path: str | Path) -> str:
    """One line on how a QDQ ONNX file stores its weight codes: how many tensors in 4-bit and in 8-bit types."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(path), load_external_data=False)
    types = [t.data_type for t in model.graph.initializer if len(t.dims) > 1]
    four = sum(t in (TensorProto.INT4, TensorProto.UINT4) for t in types)
    eight = sum(t in (TensorProto.INT8, TensorProto.UINT8) for t in types)
    if not four:
        opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
        why = (f"opset {opset} has no 4-bit types; export at opset 21 or later" if opset < 21
               else "no layer's weight codes fit 4 bits")  # fmt: skip
        return f"weight codes: all {eight} tensors in 8-bit types ({why})"
    return (f"weight codes: {four} tensors in INT4/UINT4, {eight} in 8-bit types (wider codes); onnxruntime runs "
            "4-bit layers in float")  # fmt: skip
