"""Reading an exported file back: which format it is, its contract, a callable running it, and its accuracy on
its run's test split (``qkd eval FILE``).

>>> fmt, contract, run = open_export("runs/demo/export/student-int.safetensors")
>>> evaluate_export("runs/demo/export/student-onnx.onnx")["top1"]
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from qkd.config import where_settings
from qkd.errors import QKDError
from qkd.export.contract import PIXEL_MAX, first_line, is_safetensors, preprocess, raw_from_input, read_onnx_contract
from qkd.export.executorch_pte import is_pte, load_pte
from qkd.export.int_file import load_int
from qkd.export.verify import check_split


def open_export(path: str | Path) -> tuple[str, dict, Callable[[Tensor], Tensor]]:
    """An exported file's format, contract and a callable running it (the int runtime, onnxruntime, or
    ExecuTorch for a .pte);
    anything that is not a qkd export is a one-line :class:`QKDError`."""
    path = Path(path)
    if not path.is_file():
        raise QKDError(f"exported file not found: {path}")
    if path.name.endswith(".safetensors.json"):
        raise QKDError(f"{path} is the manifest written beside an int export, for reading; give the export itself, "
                       f"{path.with_suffix('')}")  # fmt: skip
    if is_safetensors(path):
        runtime, manifest = load_int(path)
        return "int", {k: v for k, v in manifest.items() if k != "ops"}, runtime
    if is_pte(path):
        contract, run = load_pte(path)
        return "executorch", contract, run
    if path.suffix == ".pte":
        raise QKDError(f"{path} is not an ExecuTorch program (no ExecuTorch header): a damaged file? export it again "
                       "with qkd export --format executorch")  # fmt: skip
    contract = read_onnx_contract(path)
    if contract is None:
        raise QKDError(f"{path} is an ONNX model without qkd's metadata (not exported by qkd, or by an older qkd): "
                       "export it again with qkd export")  # fmt: skip
    fmt = contract.get("export_format")
    if fmt not in ("onnx", "onnx-int"):
        raise QKDError(f"{path}: its qkd metadata names the format {fmt!r}, not onnx or onnx-int")
    from qkd.export.onnx_common import onnx_runner

    try:
        run = onnx_runner(path)
    except Exception as e:
        raise QKDError(f"onnxruntime cannot load {path}: {first_line(e)}") from None
    return fmt, contract, lambda x: torch.from_numpy(run(np.asarray(x)))


#: what ``qkd eval FILE`` may change in the data settings a file carries: where the data is and how it is read
DATA_CHANGES = where_settings("data")


def evaluate_export(path: str | Path, overrides: list[str] | None = None, backend: str | None = None) -> dict:
    """Top-1 accuracy of an exported file on its run's test split (validation where there is none), the
    images prepared from raw pixels as the file's contract says. ``overrides``: ``key=value`` changes of
    :data:`DATA_CHANGES`; ``backend``: the format the caller expects the file to be (None: any)."""
    path = Path(path)
    fmt, contract, run = open_export(path)
    if backend is not None and backend != fmt:
        raise QKDError(
            f"{path} is an {fmt} export, not {backend}: evaluate it with --backend {fmt} or without --backend"
        )
    data = data_of_export(path, contract, overrides or [])
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


def data_of_export(path: Path, contract: dict, overrides: list[str]):
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
